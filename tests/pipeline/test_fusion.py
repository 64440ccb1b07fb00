"""Face fusion (pipeline.fusion) on real faces: the source's face only, in the template's skin."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.faces import Face
from pipeline.fusion import (
    EYES,
    MOUTH,
    FusionConfig,
    face_width,
    fuse_face,
    fusion_points,
    hull_mask,
    piecewise_affine_warp,
    skin_mask,
)


@pytest.fixture(scope="module")
def face_of(dlib_analyzer, face_photo):
    """(pixels, largest face) of a shared photo, at most 800 px long (biden.jpg is 2204 px tall:
    fusing at that size only costs the suite time)."""
    cache: dict[str, tuple[np.ndarray, Face]] = {}

    def analyse(name: str) -> tuple[np.ndarray, Face]:
        if name not in cache:
            image = face_photo(name)
            image.thumbnail((800, 800))
            cache[name] = (np.asarray(image), dlib_analyzer.analyze(image)[0])
        return cache[name]

    return analyse


def mean_skin_lab(image: np.ndarray, face: Face) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    return lab[skin_mask(face.landmarks, (image.shape[1], image.shape[0])) > 0].mean(axis=0)


@pytest.mark.parametrize(
    "source, template", [("biden.jpg", "obama.jpg"), ("obama.jpg", "biden.jpg"), ("obama2.jpg", "alex-lacamoire.png")]
)
def test_a_light_face_on_a_dark_skin_and_the_reverse_come_out_one_skin(source, template, face_of):
    (source_pixels, source_face), (template_pixels, template_face) = face_of(source), face_of(template)
    before = np.linalg.norm(mean_skin_lab(source_pixels, source_face) - mean_skin_lab(template_pixels, template_face))
    fused = fuse_face(template_pixels, template_face.landmarks, source_pixels, source_face.landmarks)
    after = np.linalg.norm(mean_skin_lab(fused.image, template_face) - mean_skin_lab(template_pixels, template_face))
    assert before > 5.0  # the two skins differ visibly (CIELAB dE76)
    assert after < 3.0
    # And the face did change: the source's face is there, not the template's kept.
    inside = fused.weights > 0.5
    assert np.abs(fused.image.astype(int) - template_pixels)[inside].mean() > 8


def test_nothing_of_the_source_outside_its_own_face_is_carried_over(face_of):
    """Everything of the source outside its face (hair, ears, earrings, background) painted green:
    none of it reaches the template, even one whose face is wider than the source's."""
    (source_pixels, source_face), (template_pixels, template_face) = face_of("obama.jpg"), face_of("biden.jpg")
    size = (source_pixels.shape[1], source_pixels.shape[0])
    own_face = hull_mask(fusion_points(source_face.landmarks, FusionConfig()), size) > 0
    painted = np.where(own_face[..., None], source_pixels, np.array([0, 255, 0], np.uint8))
    fused = fuse_face(template_pixels, template_face.landmarks, painted, source_face.landmarks)
    red, green, blue = (fused.image.astype(int)[..., channel] for channel in range(3))
    assert not ((green - np.maximum(red, blue)) > 60).any()
    # The fusion stays inside the template's own face: nothing changes outside its mask.
    outside = fused.mask == 0
    assert np.array_equal(fused.image[outside], template_pixels[outside])
    template_size = (template_pixels.shape[1], template_pixels.shape[0])
    assert not (fused.mask > hull_mask(fusion_points(template_face.landmarks, FusionConfig()), template_size)).any()


def test_easyphotos_blend_rule_eyes_from_the_fusion_lips_from_the_template(face_of):
    (source_pixels, source_face), (template_pixels, template_face) = face_of("obama2.jpg"), face_of("biden.jpg")
    config = FusionConfig(eyes=1.0, lips=0.0, rest=0.6, source_shape=0.0)  # the eyes stay where the template has them
    fused = fuse_face(template_pixels, template_face.landmarks, source_pixels, source_face.landmarks, config)
    points = template_face.landmarks

    def weight_at(point: np.ndarray) -> float:
        x, y = np.round(point).astype(int)
        return float(fused.weights[y, x])

    assert weight_at(points[EYES[0]].mean(axis=0)) == pytest.approx(1.0, abs=0.05)
    assert weight_at(points[EYES[1]].mean(axis=0)) == pytest.approx(1.0, abs=0.05)
    assert weight_at(points[MOUTH].mean(axis=0)) == pytest.approx(0.0, abs=0.05)
    cheek = (points[3] + points[30]) / 2  # halfway from the jaw to the nose tip
    assert weight_at(cheek) == pytest.approx(0.6, abs=0.05)
    assert fused.weights[fused.mask == 0].max() == 0.0


def test_the_warp_takes_each_triangle_to_its_place():
    """A marked source point lands on its target point; a pixel's colour comes from its own triangle."""
    rng = np.random.default_rng(0)
    source_points = np.array([[20, 20], [180, 30], [170, 170], [30, 160], [100, 90]], np.float32)
    target_points = source_points * 1.3 + rng.uniform(-6, 6, source_points.shape).astype(np.float32)
    source = np.zeros((200, 200, 3), np.uint8)
    cv2.circle(source, (100, 90), 3, (255, 255, 255), -1)  # the middle point, marked
    warped, defined = piecewise_affine_warp(source, source_points, target_points, (260, 260))
    ys, xs = np.nonzero(warped[..., 0] > 127)
    assert np.hypot(xs.mean() - target_points[4, 0], ys.mean() - target_points[4, 1]) < 1.5
    hull = hull_mask(target_points, (260, 260))
    assert (defined > 0).sum() >= 0.98 * (hull > 0).sum() and not (defined > hull).any()


def test_the_fusion_scales_with_the_face(face_of):
    """Sizes are fractions of the face's width: half-size images give the same fusion, halved."""
    (source_pixels, source_face), (template_pixels, template_face) = face_of("obama2.jpg"), face_of("biden.jpg")
    full = fuse_face(template_pixels, template_face.landmarks, source_pixels, source_face.landmarks)
    half_size = (template_pixels.shape[1] // 2, template_pixels.shape[0] // 2)
    small_template = cv2.resize(template_pixels, half_size, interpolation=cv2.INTER_AREA)
    small = fuse_face(small_template, template_face.landmarks / 2, source_pixels, source_face.landmarks)
    shrunk = cv2.resize(full.mask, half_size, interpolation=cv2.INTER_AREA) > 127
    agree = (shrunk == (small.mask > 127)).mean()
    assert agree > 0.99
    assert face_width(template_face.landmarks / 2) == pytest.approx(face_width(template_face.landmarks) / 2)
