"""Face fusion: a source face put into a template's face, in the template's skin tone and light.

Both portrait engines use it (pipeline.generate): the classic portrait is this fusion, and the
diffusion passes start from it and draw their canny and colour controls from it. Every face here
carries dlib's 68 landmarks (pipeline.faces gives them for every backend).

1. Dense warp. A piecewise-affine warp over a Delaunay triangulation of the template's 68
   landmarks (plus the brows lifted a little, so the brows come whole): each source triangle lands
   on its template triangle. The source's face fills the template's contour exactly, so a wide or
   turned template face pulls in nothing of the source outside its own face (ears, hair, earrings,
   forehead), which a 5-point similarity warp did.
2. The mask. The template's face hull intersected with the warped source's, eroded a little.
3. Skin tone and light from the template. In Lab, the warped face's low frequencies are replaced
   by the template's: each side's local mean is taken over skin pixels only (eyes, brows and mouth
   cut out) by a normalised Gaussian convolution, and the difference is added to the source. The
   source keeps its detail (features, texture); the tone and the direction of light are the
   template's, so a light face on a dark-skinned template, or the reverse, comes out one skin.
   A global Lab mean/std transfer (EasyPhoto's) matches the average only and leaves the source's
   own shading; Poisson cloning follows the template at the mask's border only and smears a
   strong tone difference across the face.
4. The blend. EasyPhoto's rule: the eyes fully from the fusion (1.0), the template's lips kept
   (0), the rest at the fusion ratio, over an 8 px blur (at 512 px), then feathered inside the
   mask so no edge of the source shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import Delaunay

# dlib's 68-point layout.
JAW = slice(0, 17)
BROWS = slice(17, 27)
EYES = (slice(36, 42), slice(42, 48))
MOUTH = slice(48, 68)
OUTER_LIPS = slice(48, 60)


@dataclass(frozen=True)
class FusionConfig:
    """Sizes are fractions of the face's width (its jaw's ends), so they hold at any scale."""

    # The numbers below were chosen with bench/fusion.py (identity, tone gap, bleed); the
    # alternatives tried and their figures are in bench/RESULTS.md.
    brow_lift: float = 0.08  # the brows lifted by this, so the warp takes them whole
    erode: float = 0.01  # the mask kept this far inside both faces
    feather: float = 0.02  # the mask's edge blurred over this, inside the mask
    # The scale of "light": tone and shading broader than this are the template's. 0.12 and 0.25
    # measured alike (identity within 0.02, tone gaps within 0.3); the broader one keeps more of
    # the source's own modelling of the face.
    tone_sigma: float = 0.25
    feature_grow: float = 0.03  # eyes, brows and mouth grown by this before cutting them from the skin
    # How much of the source's own layout of brows, eyes, nose and mouth the warp keeps (0: moved
    # onto the template's; 1: the source's, aligned onto the template face by a similarity). The
    # jaw line stays the template's either way, so nothing spills past the template's contour.
    # The layout is much of a face's identity: with the template's, doubles were recognised less.
    source_shape: float = 1.0
    # EasyPhoto's blend rule: the fusion's share on the eyes, the lips and everywhere else.
    eyes: float = 1.0
    lips: float = 0.0
    rest: float = 0.6
    # The rule's regions are grown and blurred by this: EasyPhoto's 8 px at its 512-px crop, where
    # a face (box x3) is about 160 px wide.
    rule_blur: float = 0.05


@dataclass(frozen=True)
class Fused:
    image: np.ndarray  # the template with the source face in it, uint8 RGB
    mask: np.ndarray  # where the source may show (uint8 0/255): inside both faces
    weights: np.ndarray  # the fusion's share per pixel, 0..1 (the blend rule, feathered)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + shift taking `source` points onto `target` (Umeyama); 2x3."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    source_c, target_c = source - source_mean, target - target_mean
    u, s, vt = np.linalg.svd(target_c.T @ source_c / len(source))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / source_c.var(axis=0).sum()
    shift = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, shift[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def face_width(landmarks: np.ndarray) -> float:
    """The distance between the jaw's ends (points 0 and 16): a pose-stable face size."""
    return float(np.linalg.norm(landmarks[16] - landmarks[0]))


def up_direction(landmarks: np.ndarray) -> np.ndarray:
    """A unit vector from the chin toward the forehead, square to the line between the eyes."""
    left, right = landmarks[EYES[0]].mean(axis=0), landmarks[EYES[1]].mean(axis=0)
    across = (right - left) / max(1e-6, float(np.linalg.norm(right - left)))
    up = np.array([across[1], -across[0]], np.float32)
    return up if float(up @ (left + right) / 2 - up @ landmarks[8]) > 0 else -up


def lifted_brows(landmarks: np.ndarray, lift: float) -> np.ndarray:
    """The brow points moved up by `lift` (a distance in pixels), in the face's own up direction."""
    return (landmarks[BROWS] + up_direction(landmarks) * lift).astype(np.float32)


def hairline(landmarks: np.ndarray) -> np.ndarray:
    """The brows lifted to an estimated hairline. The face's thirds: the forehead (hairline to
    brows) is about as tall as brows-to-nose-base and nose-base-to-chin, so half of brows-to-chin."""
    brows_to_chin = float(up_direction(landmarks) @ (landmarks[BROWS].mean(axis=0) - landmarks[8]))
    return lifted_brows(landmarks, 0.5 * brows_to_chin)


def fusion_points(landmarks: np.ndarray, config: FusionConfig) -> np.ndarray:
    """The 68 landmarks and the lifted brows: the warp's points (78 in all)."""
    lift = config.brow_lift * face_width(landmarks)
    return np.vstack([landmarks, lifted_brows(landmarks, lift)]).astype(np.float32)


def target_layout(template: np.ndarray, source: np.ndarray, keep: float) -> np.ndarray:
    """Where the warp puts the 68 points: the template's jaw line, and inside it the brows, eyes,
    nose and mouth `keep` of the way from the template's toward the source's own (aligned onto the
    template's inner points by a similarity, so only their shape moves, not the face)."""
    inner = slice(JAW.stop, 68)
    aligned = transform_points(similarity_transform(source[inner], template[inner]), source)
    layout = template.astype(np.float32).copy()
    layout[inner] = (1.0 - keep) * template[inner] + keep * aligned[inner]
    return layout


def hull_mask(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The convex hull of `points` filled (uint8 0/255, height x width for `size` = (w, h))."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 255)
    return mask


def disk(radius: float) -> np.ndarray:
    side = 2 * max(1, round(radius)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))


def feature_mask(landmarks: np.ndarray, size: tuple[int, int], grow: float) -> np.ndarray:
    """Eyes, brows and mouth (each its own hull), grown by `grow` pixels."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    for part in (*EYES, slice(17, 22), slice(22, 27), OUTER_LIPS):
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(landmarks[part]).astype(np.int32)), 255)
    return cv2.dilate(mask, disk(grow)) if grow >= 0.5 else mask


def skin_mask(landmarks: np.ndarray, size: tuple[int, int], grow: float = 0.03) -> np.ndarray:
    """The face's skin: its 68-point hull, eroded by `grow` face widths, without the eyes, brows
    and mouth (grown by as much). What colour statistics of a face are taken over."""
    margin = grow * face_width(landmarks)
    inner = cv2.erode(hull_mask(landmarks, size), disk(margin))
    return cv2.subtract(inner, feature_mask(landmarks, size, margin))


def piecewise_affine_warp(
    source: np.ndarray, source_points: np.ndarray, target_points: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """`source` warped so each triangle of the target points' Delaunay triangulation takes its
    source triangle's pixels; returns the warped image (`size` = (w, h)) and where it is defined
    (uint8 0/255: the target points' hull)."""
    width, height = size
    triangles = Delaunay(target_points.astype(np.float64)).simplices
    labels = np.full((height, width), -1, np.int32)
    matrices = np.zeros((len(triangles), 2, 3), np.float32)
    for index, corners in enumerate(triangles):
        target, origin = target_points[corners].astype(np.float32), source_points[corners].astype(np.float32)
        (ax, ay), (bx, by) = target[1] - target[0], target[2] - target[0]
        area = abs(ax * by - ay * bx)
        if area < 1e-3:
            continue
        matrices[index] = cv2.getAffineTransform(target, origin)  # target pixel -> source pixel
        cv2.fillConvexPoly(labels, np.round(target).astype(np.int32), index)
    ys, xs = np.nonzero(labels >= 0)
    chosen = matrices[labels[ys, xs]]
    map_x = np.full((height, width), -1.0, np.float32)
    map_y = np.full((height, width), -1.0, np.float32)
    map_x[ys, xs] = chosen[:, 0, 0] * xs + chosen[:, 0, 1] * ys + chosen[:, 0, 2]
    map_y[ys, xs] = chosen[:, 1, 0] * xs + chosen[:, 1, 1] * ys + chosen[:, 1, 2]
    warped = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    inside = (map_x >= 0) & (map_x <= source.shape[1] - 1) & (map_y >= 0) & (map_y <= source.shape[0] - 1)
    return warped, np.where((labels >= 0) & inside, 255, 0).astype(np.uint8)


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _rgb(lab: np.ndarray) -> np.ndarray:
    lab = lab.astype(np.float32)
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    return np.clip(np.round(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255.0), 0, 255).astype(np.uint8)


def local_mean(lab: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """The Gaussian mean of `lab` around each pixel over the weighted pixels only (normalised
    convolution); near no weighted pixel at all, the weighted pixels' overall mean."""
    w = weights.astype(np.float32)
    total = cv2.GaussianBlur(w, (0, 0), sigma)
    summed = cv2.GaussianBlur(lab * w[..., None], (0, 0), sigma)
    overall = (lab * w[..., None]).sum(axis=(0, 1)) / max(1e-6, float(w.sum()))
    enough = total[..., None] > 1e-3
    return np.where(enough, summed / np.maximum(total[..., None], 1e-6), overall)


def match_tone(
    face: np.ndarray, template: np.ndarray, skin: np.ndarray, sigma: float, keep: np.ndarray
) -> np.ndarray:
    """`face` with the template's skin tone and light: in Lab, its local mean over `skin` swapped
    for the template's over the same pixels (both images in the template's geometry). Where `keep`
    (0..1) is 1 the face keeps its own colours: a skin's shift would turn dark brows and eyes blue
    or grey going from a brown skin to a pink one, and the reverse."""
    face_lab, template_lab = _lab(face), _lab(template)
    weights = skin.astype(np.float32) / 255.0
    shift = local_mean(template_lab, weights, sigma) - local_mean(face_lab, weights, sigma)
    return _rgb(face_lab + shift * (1.0 - keep[..., None]))


def blend_rule(fused: np.ndarray, template: np.ndarray, mask: np.ndarray, config: FusionConfig) -> np.ndarray:
    """The fusion's share per pixel (0..1): EasyPhoto's rule (the eyes where the fusion put them,
    the lips where either face has them, the rest), grown and blurred so each region keeps its
    share all over, then feathered to 0 at the mask's edge and kept inside it."""
    blur = max(0.5, config.rule_blur * face_width(template))
    weights = np.full(mask.shape, config.rest, np.float32)
    for parts, share in (((fused[EYES[0]], fused[EYES[1]]), config.eyes), ((fused[MOUTH], template[MOUTH]), config.lips)):
        region = np.zeros(mask.shape, np.uint8)
        for points in parts:
            cv2.fillConvexPoly(region, cv2.convexHull(np.round(points).astype(np.int32)), 255)
        weights[cv2.dilate(region, disk(blur)) > 0] = share
    weights = cv2.GaussianBlur(weights, (0, 0), blur / 2)  # 2 sigma = the grown margin: each region keeps its share
    return weights * feathered(mask, config.feather * face_width(template))


def feathered(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A 0..1 float mask with soft edges that stays inside the hard mask (no halo outside it)."""
    sigma = max(0.5, sigma)
    inner = cv2.erode(mask, disk(sigma))
    soft = cv2.GaussianBlur(inner.astype(np.float32) / 255.0, (0, 0), sigma)
    return np.minimum(soft, mask.astype(np.float32) / 255.0)


def composite(base: np.ndarray, overlay: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = base.astype(np.float32) * (1.0 - alpha[..., None]) + overlay.astype(np.float32) * alpha[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def fuse_face(
    template: np.ndarray,
    template_landmarks: np.ndarray,
    source: np.ndarray,
    source_landmarks: np.ndarray,
    config: FusionConfig = FusionConfig(),
) -> Fused:
    """The source face fused into the template's face (module docstring)."""
    size = (template.shape[1], template.shape[0])
    width = face_width(template_landmarks)
    layout = target_layout(template_landmarks, source_landmarks, config.source_shape)
    target = fusion_points(layout, config)
    warped, defined = piecewise_affine_warp(source, fusion_points(source_landmarks, config), target, size)
    outline = cv2.bitwise_and(hull_mask(target, size), hull_mask(fusion_points(template_landmarks, config), size))
    mask = cv2.erode(cv2.bitwise_and(outline, defined), disk(config.erode * width))
    if not mask.any():
        return Fused(template.copy(), mask, np.zeros(mask.shape, np.float32))
    # Skin of both faces: neither one's eyes, brows or mouth (grown) count toward the tone, and the
    # source's own eyes, brows and mouth (not grown: the skin around them is skin) keep their colours.
    skin = cv2.bitwise_and(skin_mask(template_landmarks, size, config.feature_grow), skin_mask(layout, size, config.feature_grow))
    edge = max(0.5, config.feather * width)
    features = cv2.GaussianBlur(feature_mask(layout, size, 0).astype(np.float32) / 255.0, (0, 0), edge)
    source_face = np.where(defined[..., None] > 0, warped, template)
    toned = match_tone(source_face, template, skin, config.tone_sigma * width, features)
    weights = blend_rule(layout, template_landmarks, mask, config)
    return Fused(composite(template, toned, weights), mask, weights)
