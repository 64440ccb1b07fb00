"""Selfies in, training set out: check every photo, pick the best, crop them for training.

Steps (EasyPhoto's preprocessing plus an image-quality score and readable refusals):

1. Per photo: decode (JPEG, PNG, HEIC...; a bounded number of progressive scans), upright
   by EXIF orientation when it can be read, detect faces. A face whose landmarks say it lies on
   its side or upside down (roll past ROLL_LIMIT degrees), or a photo with no face found that
   shows one once turned by a quarter or half turn (dlib's detector finds no face past about 40
   degrees: an upside-down photo without an EXIF tag), is turned upright and analysed again.
   Refuse with a reason code: not_an_image, no_face, multiple_faces (a second face at least
   `background_face_ratio` as wide as the largest; smaller ones are people in the
   background), face_cut_off (more than `max_face_outside` of the face box lies outside the
   photo: half a face trains half a double), face_too_small, too_dark, too_blurry (checked
   after darkness because a dark face also has little contrast). Score the rest: angle
   `(90 - |eye-line angle|) / 90`, quality = sharpness x exposure x size scores, each 0..1.
2. Near-duplicates: a photo whose embedding lies closer than the backend's near-duplicate
   distance to a better-quality photo's, or to that photo's face mirrored, is the same picture
   again (re-encoded, resized, cropped or mirrored) and goes: it adds no new view, and it would
   be one more vote below. The mirrored face is analysed only for pairs closer than the
   backend's mirror-check distance (`mirror_embedding`).
3. Who the double is (`select_person`): the photos are grouped by average linkage at the
   backend's same-person distance, and a photo belongs to the double when it lies within that
   distance of most of the double's other photos (a vote, not an average it helped make: a
   stranger, or two photos of him, cannot move the line that judges them). When no group
   agrees with most of the set and two groups hold two photos or more (3 photos of one person
   and 2 of another), the set shows several people: nothing is selected, each group's photos
   say so (`several_people`, with the group's number) and the person chooses. A single photo
   unlike the rest is a stranger (`different_person`). similarity = cosine to the unit mean of
   the double's other photos.
4. The top `max_train_photos` by similarity x quality are selected; the rest are refused as
   not_needed. The reference face is the selected photo with the best angle x similarity. With
   `held_out_from` photos or more, the next best by that measure is held out (`held_out`): not
   trained on and not fused, kept to score portraits against a real photo the model never saw.
5. Selected photos are cropped around the face (box x `crop_scale`, square, `crop_size` px),
   passed through the restoration hook, and the person is cut onto white by the segmenter
   hook (default: OpenCV GrabCut seeded by the face box and a body rectangle; offline and
   model-free, good enough to remove most of a background, not hair-exact).
6. What step 1 found for each photo (`PhotoCheck`: the face, its scores or the refusal) comes
   back in the result; given to the next run as `known`, it stands in for detecting and
   embedding that photo again. The site keeps it on each photo, so adding a 20th photo
   analyses one, not 20 (4.10 s against 0.99 s for 20 photos on 2 CPU cores). The training
   images of the last run, given as `cut`, likewise stand in for segmenting those photos again.

Folder written by `write_preprocessed`, read by the training and portrait stages:

    OUT/persona.json    everything below, plus every photo's decision and scores
    OUT/train/NN.png    training images, NN = rank (00 best), RGB, crop_size square
    OUT/train/NN.txt    the caption of that image (the trigger phrase)
    OUT/reference.png   the reference photo's crop, original background kept

persona.json (version 1):

    {"version": 1, "backend": "dlib", "caption": "...",
     "cut_key": "...",                            # how train/ was cut (preprocess's `cut`)
     "reference": {"name": "obama.jpg", "image": "reference.png",
                   "box": [x0, y0, x1, y1],       # the face, in reference.png pixels
                   "keypoints": [[x, y] x 5]}     # same pixels, faces.py order
                  or null when no photo was accepted,
     "train": [{"image": "train/00.png", "name": "obama.jpg", "embedding": [...]}, ...],
     "held_out": {"name": "obama2.jpg", "embedding": [...]} or null,   # step 4
     "photos": [{"name", "accepted", "reason", "message", "scores", "person", "held_out"}, ...]}

`reason` is a code (null when accepted), `message` its English text for people (translate
with gettext), `scores` the fields of `PhotoScores`, or null when the photo was refused
before one face was measured. `person` numbers the groups (1, 2...) when the set shows
several people, else null; `held_out` is true for the held-out photo (accepted, not trained).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from pipeline.common import CancelToken, Progress, ProgressCallback, gettext_noop, ignore_progress
from pipeline.faces import Face, FaceAnalyzer, FaceThresholds, load_face_analyzer

register_heif_opener()

REASONS = {
    "not_an_image": gettext_noop("This file is not a photo we can read."),
    "no_face": gettext_noop("We could not find a face in this photo."),
    "multiple_faces": gettext_noop("This photo shows more than one face. Please use photos of you alone."),
    "face_cut_off": gettext_noop("Your face is cut off by the edge of this photo. Please use photos that show your whole face."),
    "face_too_small": gettext_noop("Your face is too small in this photo. Please take it from closer."),
    "too_blurry": gettext_noop("This photo is too blurry."),
    "too_dark": gettext_noop("This photo is too dark."),
    "different_person": gettext_noop("This face does not look like the person in your other photos."),
    "several_people": gettext_noop("These photos show more than one person. Choose who your double is."),
    "near_duplicate": gettext_noop("This photo is almost the same as another one you uploaded."),
    "not_needed": gettext_noop("We already have enough better photos, so this one was not needed."),
}

Restorer = Callable[[Image.Image], Image.Image]
Segmenter = Callable[[Image.Image, tuple[float, float, float, float]], Image.Image]


@dataclass(frozen=True)
class PreprocessConfig:
    """Defaults follow EasyPhoto: top 15 photos, face box x3, 512 px, a fixed trigger phrase."""

    max_train_photos: int = 15
    crop_scale: float = 3.0
    crop_size: int = 512
    caption: str = "photobooth_face, photobooth, 1person"
    background_face_ratio: float = 0.5
    # obama_partial_face.jpg, the official portrait cut through the face, has 23% of dlib's
    # box outside it; whole faces have none.
    max_face_outside: float = 0.1
    # From this many accepted photos on, one is held out of training and fusion (step 4): with
    # 6 or more left to train on, the double loses little.
    held_out_from: int = 7


@dataclass(frozen=True)
class PhotoScores:
    face_size: float  # face box width in the photo, pixels
    sharpness: float  # variance of the Laplacian, grey face box at 128x128
    brightness: float  # mean grey level of the face box, 0..255
    angle: float  # (90 - |eye-line angle in degrees|) / 90
    quality: float  # sharpness x exposure x size scores, 0..1
    similarity: float | None = None  # cosine to the unit mean of the double's other photos, once known
    # The distance within which most of the double's other photos lie (select_person's vote):
    # at most the same-person distance for the double's photos, beyond it for a stranger's.
    majority_distance: float | None = None


@dataclass(frozen=True)
class PhotoDecision:
    name: str
    accepted: bool
    reason: str | None  # a REASONS key; None when accepted
    scores: PhotoScores | None  # None when refused before one face was measured
    person: int | None = None  # the photo's group (1, 2...) when the set shows several people
    held_out: bool = False  # accepted, and kept out of training and fusion (step 4)

    @property
    def message(self) -> str | None:
        return REASONS[self.reason] if self.reason else None


@dataclass(frozen=True)
class TrainingImage:
    name: str
    image: Image.Image  # crop_size square, restored, person on white
    embedding: np.ndarray


@dataclass(frozen=True)
class FaceCrop:
    image: Image.Image  # crop_size square
    box: tuple[float, float, float, float]  # the face box in crop pixels
    keypoints: np.ndarray  # (5, 2) in crop pixels


@dataclass(frozen=True)
class ReferenceFace:
    name: str
    crop: FaceCrop  # original background kept: the portrait stage fuses this face


@dataclass(frozen=True)
class PhotoCheck:
    """What the per-photo checks found, without the pixels: a later run over the same photo
    (one more upload, one deleted) takes it instead of detecting and embedding again, which is
    about three quarters of a photo's analysis time. `key` says which checks produced it."""

    key: str
    reason: str | None  # the refusal, or None: the photo is a candidate
    face: Face | None  # in the photo turned by `turn`
    scores: PhotoScores | None  # similarity not set: it depends on the other photos
    turn: int = 0  # degrees counter-clockwise (PIL's rotate) that turned the face upright

    def to_json(self) -> dict:
        face = self.face
        return {
            "key": self.key,
            "reason": self.reason,
            "turn": self.turn,
            "scores": None if self.scores is None else asdict(self.scores),
            "face": None if face is None else {
                "box": list(face.box),
                "score": face.score,
                "keypoints": face.keypoints.tolist(),
                "embedding": face.embedding.tolist(),
                "landmarks": None if face.landmarks is None else face.landmarks.tolist(),
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> PhotoCheck:
        face = data["face"]
        if face is not None:
            face = Face(
                tuple(face["box"]), face["score"], np.array(face["keypoints"], np.float32),
                np.array(face["embedding"], np.float32),
                None if face["landmarks"] is None else np.array(face["landmarks"], np.float32),
            )
        scores = None if data["scores"] is None else PhotoScores(**data["scores"])
        return cls(data["key"], data["reason"], face, scores, data.get("turn", 0))


# Part of every check's key: raise it when check_photo decides differently, so stored checks
# are redone rather than trusted.
CHECK_VERSION = 3  # 3: photos turned upright


def check_key(analyzer: FaceAnalyzer, config: PreprocessConfig) -> str:
    """The face models, their thresholds, the checks' version and the settings the checks read."""
    settings = (
        analyzer.thresholds, config.background_face_ratio, config.max_face_outside, config.crop_scale, config.crop_size
    )
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:12]
    return f"{analyzer.model_id}/v{CHECK_VERSION}/{digest}"


CUT_VERSION = 1  # raise when what grabcut_onto_white draws changes


def cut_key(restore: Restorer, segment: Segmenter) -> str:
    """Which restoration and segmentation cut the training images out of their crops."""

    def name(function) -> str:
        return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__name__)}"

    return f"{name(restore)}+{name(segment)}/v{CUT_VERSION}"


@dataclass(frozen=True)
class CutOuts:
    """An earlier run's training images by photo name, and the `cut_key` they were cut with."""

    key: str
    images: Mapping[str, Image.Image]


@dataclass(frozen=True)
class HeldOut:
    """An accepted photo kept out of training and fusion: portraits are scored against it, a real
    photo the model never saw, since likeness to the fused reference rewards pasting it."""

    name: str
    embedding: np.ndarray


@dataclass(frozen=True)
class PreprocessResult:
    backend: str
    caption: str
    decisions: list[PhotoDecision]  # in input order
    train: list[TrainingImage]  # best first
    reference: ReferenceFace | None
    checks: list[PhotoCheck]  # in input order: what a later run may reuse
    cut_key: str  # how the training images were cut: a later run reuses them when its own is the same
    held_out: HeldOut | None = None

    @property
    def people(self) -> list[list[str]]:
        """The photos of each person, by name, when the set shows several people (nothing was
        selected then); empty when it shows one."""
        groups: dict[int, list[str]] = {}
        for decision in self.decisions:
            if decision.person is not None:
                groups.setdefault(decision.person, []).append(decision.name)
        return [groups[number] for number in sorted(groups)]


@dataclass(frozen=True)
class Candidate:
    """A photo that passed the per-photo checks; only its crop is kept, not the photo."""

    index: int
    name: str
    face: Face
    scores: PhotoScores
    crop: FaceCrop

    @property
    def rank(self) -> float:
        """Training preference: similarity x quality (similarity is set by then)."""
        return self.scores.similarity * self.scores.quality

    def refuse(self, reason: str, person: int | None = None) -> PhotoDecision:
        return PhotoDecision(self.name, False, reason, self.scores, person)


def no_restoration(image: Image.Image) -> Image.Image:
    """Default restoration hook: keep the crop as it is."""
    return image


def grabcut_onto_white(image: Image.Image, face_box: tuple[float, float, float, float]) -> Image.Image:
    """Cut the person onto white with OpenCV GrabCut, seeded from the face box.

    Seeds, in a 192-px copy (GrabCut's time grows with pixels: 0.1 s here against 0.22 s
    at 256 px for the same look once the mask is smoothed back up): the inner face is person;
    the face, hair above it and a body rectangle three face widths wide below the chin are
    probably person; the rest is probably background; a thin band along the top, and along
    the sides above the chin, is background, which gives GrabCut its background colours.
    """
    work = 192
    scale = work / image.width
    bgr = cv2.resize(np.asarray(image)[:, :, ::-1], (work, work), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = (v * scale for v in face_box)
    fw, fh = x1 - x0, y1 - y0
    mask = np.full((work, work), cv2.GC_PR_BGD, np.uint8)

    def seed(left: float, top: float, right: float, bottom: float, label: int) -> None:
        # Clipped first: a negative slice start would wrap around to the other side.
        a, b, c, d = (int(min(max(v, 0), work)) for v in (left, top, right, bottom))
        mask[b:d, a:c] = label

    band = max(2, work // 32)
    seed(x0 - fw, y1, x1 + fw, work, cv2.GC_PR_FGD)  # body below the chin
    seed(x0 - 0.1 * fw, y0 - 0.5 * fh, x1 + 0.1 * fw, y1, cv2.GC_PR_FGD)  # face and hair
    seed(x0 + 0.2 * fw, y0 + 0.2 * fh, x1 - 0.2 * fw, y1 - 0.2 * fh, cv2.GC_FGD)  # inner face
    seed(0, 0, work, band, cv2.GC_BGD)
    seed(0, 0, band, y1, cv2.GC_BGD)
    seed(work - band, 0, work, y1, cv2.GC_BGD)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(bgr, mask, None, background, foreground, 2, cv2.GC_INIT_WITH_MASK)
    person = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
    alpha = cv2.GaussianBlur(cv2.resize(person, image.size, interpolation=cv2.INTER_LINEAR), (0, 0), 1.5)
    pixels = np.asarray(image, dtype=np.float32)
    out = pixels * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])
    return Image.fromarray(out.round().astype(np.uint8))


# Decoding a progressive JPEG costs about 1 ns of CPU per pixel for each of its scans (libjpeg-turbo
# 3 on a 2-core machine: 16 MP x 1,000 scans took 16 s, 9 MP x 2,000 scans 15 s), so a few hundred
# kilobytes of near-empty scans (a "scan bomb") held the decoder for half a minute. Encoders write
# 6 (grey) or 10 (colour) scans, optimisers rarely 20. With these limits the costliest JPEG the
# site accepts, 50 MP in 12 scans, took 1.8 s to check and store, most of it the 1.7 s any 50 MP
# photo takes; a bomb is refused in a millisecond, before decoding.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 600_000_000  # scans x pixels


def too_costly_to_decode(data: bytes, image: Image.Image) -> bool:
    """Whether `image`, opened from `data` and not yet decoded, holds more progressive scans than
    the decoding budget allows (MAX_JPEG_SCANS, MAX_JPEG_SCAN_PIXELS).

    The scans are counted as the file's start-of-scan markers (FF DA), not by walking its
    segments: one pass in C whatever the file holds, where a Python loop over a million tiny
    segments would itself cost seconds. Inside compressed data FF is only ever followed by 00 or
    a marker, so no scan is missed; metadata bytes or an MPO's second picture can only add to
    the count (two scans in 64 KB of random bytes): at worst an odd photo is refused, never a
    bomb decoded.
    """
    if image.format not in ("JPEG", "MPO"):
        return False
    scans = data.count(b"\xff\xda")
    return scans > MAX_JPEG_SCANS or scans * image.width * image.height > MAX_JPEG_SCAN_PIXELS


def upright(image: Image.Image) -> Image.Image:
    """The decoded image turned by its EXIF orientation, or as it is when that cannot be read.

    Metadata is advisory: cameras and editors write malformed EXIF (a bad TIFF header raises
    SyntaxError, a junk PNG "Raw profile type exif" chunk ValueError, a cut directory
    struct.error...), and the pixels are good all the same.
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def load_photo(data: Image.Image | bytes) -> Image.Image | None:
    """Decode and upright a photo as RGB (transparency onto white); None if unreadable or too
    costly to decode. An MPO (multi-picture JPEG) gives its first picture."""
    try:
        if isinstance(data, Image.Image):
            image = data
        else:
            image = Image.open(io.BytesIO(data))
            if too_costly_to_decode(data, image):
                return None
        image.load()
        image = upright(image)
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(image, mask=image.getchannel("A"))
            return flat
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def outside_fraction(face: Face, size: tuple[int, int]) -> float:
    """How much of the face box lies outside a photo of `size`: 0 for a whole face."""
    x0, y0, x1, y1 = face.box
    inside = max(0.0, min(x1, size[0]) - max(x0, 0.0)) * max(0.0, min(y1, size[1]) - max(y0, 0.0))
    return 1.0 - inside / ((x1 - x0) * (y1 - y0))


def measure_face(image: Image.Image, face: Face, config: PreprocessConfig, analyzer: FaceAnalyzer) -> PhotoScores:
    """Angle and image-quality scores of one face (similarity comes later, from the group)."""
    x0, y0, x1, y1 = face.box  # detectors may place a box partly outside the photo
    inside = (max(0, round(x0)), max(0, round(y0)), min(image.width, round(x1)), min(image.height, round(y1)))
    grey = image.crop(inside).convert("L").resize((128, 128), Image.BILINEAR)
    grey_pixels = np.asarray(grey, dtype=np.float32)
    sharpness = float(cv2.Laplacian(grey_pixels, cv2.CV_32F).var())
    brightness = float(grey_pixels.mean())
    (lx, ly), (rx, ry) = face.keypoints[0], face.keypoints[1]
    angle = (90.0 - abs(math.degrees(math.atan2(ry - ly, rx - lx)))) / 90.0
    sharpness_score = min(1.0, sharpness / analyzer.thresholds.good_sharpness)
    exposure_score = max(0.0, 1.0 - abs(brightness - 127.5) / 127.5)
    # Below crop_size / crop_scale pixels the training crop has to be upscaled.
    size_score = min(1.0, face.width * config.crop_scale / config.crop_size)
    return PhotoScores(
        face_size=face.width,
        sharpness=sharpness,
        brightness=brightness,
        angle=angle,
        quality=sharpness_score * exposure_score * size_score,
    )


def crop_around_face(image: Image.Image, face: Face, config: PreprocessConfig) -> FaceCrop:
    """Square crop of `crop_scale` face boxes, shifted (and shrunk if needed) to stay inside
    the photo, so no padding is ever invented."""
    side = min(config.crop_scale * max(face.width, face.height), image.width, image.height)
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    left = min(max(cx - side / 2, 0.0), image.width - side)
    top = min(max(cy - side / 2, 0.0), image.height - side)
    scale = config.crop_size / side
    crop = image.resize(
        (config.crop_size, config.crop_size), Image.LANCZOS, box=(left, top, left + side, top + side)
    )
    x0, y0, x1, y1 = face.box
    box = ((x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale, (y1 - top) * scale)
    keypoints = (face.keypoints - np.array([left, top], np.float32)) * scale
    return FaceCrop(crop, box, keypoints.astype(np.float32))


# A face rolled further than this (its eyes-to-mouth line against the photo's vertical) is
# turned upright by the nearest quarter turn and analysed again.
ROLL_LIMIT = 45.0


def roll(face: Face) -> float:
    """How far the face is turned in the photo's plane, in degrees: 0 upright, 180 upside down,
    -90 when PIL's rotate(90) made it (so rotate(roll) turns it back). From the keypoints, so
    it holds for any backend whose landmarks follow the face (dlib's HOG detector finds no face
    past about 40 degrees; SCRFD finds faces at any roll)."""
    eyes, mouth = face.keypoints[:2].mean(axis=0), face.keypoints[3:5].mean(axis=0)
    dx, dy = mouth - eyes
    return math.degrees(math.atan2(-dx, dy))


def upright_turn(face: Face) -> int:
    """The quarter turns (degrees for PIL's rotate, 0..270) that bring the face upright."""
    if abs(roll(face)) <= ROLL_LIMIT:
        return 0
    return round(roll(face) / 90.0) * 90 % 360


def turned(image: Image.Image, turn: int) -> Image.Image:
    """The photo turned `turn` degrees counter-clockwise (quarter turns: exact, no resampling)."""
    return image.rotate(turn, expand=True) if turn else image


def find_faces(image: Image.Image, analyzer: FaceAnalyzer) -> tuple[int, list[Face]]:
    """The photo's faces, largest first, with the turn that shows them upright.

    A face whose landmarks say it lies on its side or upside down is analysed again turned
    upright; a photo with no face is tried turned by a half and by either quarter turn. Those
    three tries look at a copy TURN_SEARCH_LONG_SIDE px long (a turned selfie's face is large),
    and only a turn that shows a face is analysed in full: at full size, a 6 MP photo with no face
    cost 2.3 s of CPU to refuse, most of it dlib's upsampled second look at each turn.
    """
    faces = analyzer.analyze(image)
    if faces:
        turn = upright_turn(faces[0])
        if turn and (again := analyzer.analyze(turned(image, turn))):
            return turn, again
        return 0, faces
    small = image.copy()
    small.thumbnail((TURN_SEARCH_LONG_SIDE, TURN_SEARCH_LONG_SIDE))
    for turn in (180, 90, 270):
        seen = analyzer.analyze(turned(small, turn))
        if seen and upright_turn(seen[0]) == 0 and (faces := analyzer.analyze(turned(image, turn))):
            return turn, faces
    return 0, []


TURN_SEARCH_LONG_SIDE = 400


def inspect_photo(image: Image.Image, analyzer: FaceAnalyzer, config: PreprocessConfig) -> PhotoCheck:
    """Detection, embedding and the per-photo refusals of a decoded photo."""
    key = check_key(analyzer, config)
    turn, faces = find_faces(image, analyzer)
    if not faces:
        return PhotoCheck(key, "no_face", None, None)
    image = turned(image, turn)
    face = faces[0]
    if any(other.width >= config.background_face_ratio * face.width for other in faces[1:]):
        return PhotoCheck(key, "multiple_faces", None, None)
    scores = measure_face(image, face, config, analyzer)
    limits = analyzer.thresholds
    for failed, reason in (
        (outside_fraction(face, image.size) > config.max_face_outside, "face_cut_off"),
        (face.width < limits.min_face_size, "face_too_small"),
        (scores.brightness < limits.min_brightness, "too_dark"),
        (scores.sharpness < limits.min_sharpness, "too_blurry"),
    ):
        if failed:
            return PhotoCheck(key, reason, face, scores, turn)
    return PhotoCheck(key, None, face, scores, turn)


def check_photo(
    index: int,
    name: str,
    data: Image.Image | bytes,
    analyzer: FaceAnalyzer,
    config: PreprocessConfig,
    known: PhotoCheck | None = None,
) -> tuple[Candidate | PhotoDecision, PhotoCheck]:
    """The per-photo checks: a candidate or a refusal with its reason, and what was found.

    `known`, an earlier run's check of the same photo, stands in for detection and embedding
    when its key matches; the photo is decoded all the same (a candidate's crop needs it).
    """
    key = check_key(analyzer, config)
    image = load_photo(data)
    if image is None:
        return PhotoDecision(name, False, "not_an_image", None), PhotoCheck(key, "not_an_image", None, None)
    check = known if known is not None and known.key == key else inspect_photo(image, analyzer, config)
    if check.reason is not None:
        return PhotoDecision(name, False, check.reason, check.scores), check
    crop = crop_around_face(turned(image, check.turn), check.face, config)
    return Candidate(index, name, check.face, check.scores, crop), check


def pairwise_distances(embeddings: np.ndarray) -> np.ndarray:
    """L2 distances between every two rows."""
    return np.linalg.norm(embeddings[:, None, :] - embeddings[None, :, :], axis=-1)


def majority_distance(distances: np.ndarray) -> float:
    """The distance within which a strict majority of these lie (0 when there are none): a
    photo agrees with most of the others when this is within the same-person distance."""
    if len(distances) == 0:
        return 0.0
    return float(np.sort(distances)[len(distances) // 2])


def group_faces(distances: np.ndarray, limit: float) -> list[list[int]]:
    """Average-linkage groups: the two groups whose photos lie closest on average are merged
    while that average is within `limit`. Largest first, then by first photo.

    An average, not the closest pair, so a look-alike near one photo does not chain two people
    into one group; not the farthest pair, so one poor photo does not split a person in two.
    """
    groups = [[index] for index in range(len(distances))]
    while len(groups) > 1:
        closest, a, b = min(
            (float(distances[np.ix_(groups[a], groups[b])].mean()), a, b)
            for a in range(len(groups))
            for b in range(a + 1, len(groups))
        )
        if closest > limit:
            break
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups, key=lambda group: (-len(group), group[0]))


@dataclass(frozen=True)
class Selection:
    """Who the double is, by position in the embeddings given to `select_person`."""

    person: list[int]  # the double's photos; empty when the set shows several people
    people: list[list[int]]  # each person's photos when it does (nothing selected then), else empty
    majority_distances: list[float]  # per photo: to the double's other photos (its own person's when several)


def select_person(embeddings: np.ndarray, limit: float) -> Selection:
    """The double's photos: those within `limit` of most of the double's other photos.

    The double is the largest group (group_faces), or the first photo when no two agree. When
    that group's photos do not agree with most of the set (it holds no more than (n + 1) / 2 of
    n photos) and another group holds two or more, the set shows several people: a vote cannot
    say who the double is, and a second person is never used silently, so the person chooses.
    """
    count = len(embeddings)
    if count == 0:
        return Selection([], [], [])
    distances = pairwise_distances(embeddings)
    groups = group_faces(distances, limit)
    people = [group for group in groups if len(group) >= 2]
    several = len(people) >= 2 and len(groups[0]) <= (count + 1) / 2
    # Each photo is judged by the double's photos; when there are several people, by its own
    # group's (a photo alone, by the largest group's).
    judged_by = dict.fromkeys(range(count), groups[0])
    if several:
        judged_by.update((i, group) for group in people for i in group)
    votes = [majority_distance(distances[i, [j for j in judged_by[i] if j != i]]) for i in range(count)]
    if several:
        return Selection([], people, votes)
    return Selection([i for i in range(count) if votes[i] <= limit], [], votes)


def mirror_embedding(candidate: Candidate, analyzer: FaceAnalyzer) -> np.ndarray | None:
    """The embedding of the candidate's face mirrored, from its crop (face box x3 at 512 px, so
    the analysis is small), or None when no face is found there."""
    faces = analyzer.analyze(ImageOps.mirror(candidate.crop.image))
    return faces[0].embedding if faces else None


def is_near_duplicate(
    kept: Candidate, other: Candidate, limits: FaceThresholds, mirrored: Callable[[Candidate], np.ndarray | None]
) -> bool:
    """Whether `other` is `kept`'s picture again: re-encoded, resized, cropped a little, or mirrored
    (`mirrored` gives kept's face mirrored; asked only for pairs within the mirror-check distance)."""
    distance = float(np.linalg.norm(kept.face.embedding - other.face.embedding))
    if distance < limits.near_duplicate_distance:
        return True
    if distance >= limits.mirror_check_distance:
        return False
    mirror = mirrored(kept)
    return mirror is not None and float(np.linalg.norm(mirror - other.face.embedding)) < limits.near_duplicate_distance


def scored(candidate: Candidate, judges: Sequence[Candidate], vote: float | None) -> Candidate:
    """The candidate with its similarity (cosine to the unit mean of the judges other than
    itself; 1.0 when there are none) and its majority distance."""
    others = [judge.face.embedding for judge in judges if judge.index != candidate.index]
    similarity = 1.0
    if others:
        centre = np.mean(others, axis=0)
        similarity = float(candidate.face.embedding @ centre / np.linalg.norm(centre))
    return replace(candidate, scores=replace(candidate.scores, similarity=similarity, majority_distance=vote))


def reference_order(candidate: Candidate) -> float:
    """How well a photo serves as the face portraits are fused from: frontal and typical."""
    return candidate.scores.angle * candidate.scores.similarity


def preprocess(
    photos: Sequence[tuple[str, Image.Image | bytes]],
    analyzer: FaceAnalyzer,
    config: PreprocessConfig = PreprocessConfig(),
    restore: Restorer = no_restoration,
    segment: Segmenter = grabcut_onto_white,
    progress: ProgressCallback = ignore_progress,
    cancel: CancelToken | None = None,
    known: Mapping[str, PhotoCheck] | None = None,
    cut: CutOuts | None = None,
) -> PreprocessResult:
    """Check, score and select the photos of one person and cut their training images.

    `known` maps photo names to an earlier run's checks (PreprocessResult.checks), which are
    taken instead of analysing those photos again; the selection is always made afresh.
    `cut` holds that run's training images (PreprocessResult.train and .cut_key): a photo whose
    check was taken from `known` has the same crop as then, so, when they were cut the same way,
    its cut-out is taken too instead of restoring and segmenting the crop again (GrabCut is most
    of what is left to do).
    """
    cancel = cancel or CancelToken()
    known = known or {}
    key = cut_key(restore, segment)
    cut_outs = cut.images if cut is not None and cut.key == key else {}
    reused: set[str] = set()
    steps = len(photos) + min(len(photos), config.max_train_photos)
    decisions: dict[int, PhotoDecision] = {}
    candidates: list[Candidate] = []
    checks: list[PhotoCheck] = []
    for index, (name, data) in enumerate(photos):
        cancel.raise_if_cancelled()
        checked, check = check_photo(index, name, data, analyzer, config, known.get(name))
        checks.append(check)
        if check is known.get(name):
            reused.add(name)
        if isinstance(checked, PhotoDecision):
            decisions[index] = checked
        else:
            candidates.append(checked)
        progress(Progress("preprocess", (index + 1) / steps, f"analysed {name}"))

    limits = analyzer.thresholds
    mirrors: dict[int, np.ndarray | None] = {}

    def mirrored(candidate: Candidate) -> np.ndarray | None:
        if candidate.index not in mirrors:
            cancel.raise_if_cancelled()
            mirrors[candidate.index] = mirror_embedding(candidate, analyzer)
        return mirrors[candidate.index]

    distinct: list[Candidate] = []
    copies: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (-c.scores.quality, c.index)):
        near = any(is_near_duplicate(kept, candidate, limits, mirrored) for kept in distinct)
        (copies if near else distinct).append(candidate)
    distinct.sort(key=lambda c: c.index)  # in the person's order: with no two alike, the first leads
    selection = select_person(np.array([c.face.embedding for c in distinct]), limits.same_person_distance)
    # Whose likeness the other photos' similarity is to: the double's, or the largest group's.
    judges = [distinct[i] for i in (selection.people[0] if selection.people else selection.person)]
    same_person: list[Candidate] = []
    for number, group in enumerate(selection.people, start=1):
        for i in group:
            candidate = scored(distinct[i], [distinct[j] for j in group], selection.majority_distances[i])
            decisions[candidate.index] = candidate.refuse("several_people", person=number)
    for i, candidate in enumerate(distinct):
        if candidate.index in decisions:
            continue
        candidate = scored(candidate, judges, selection.majority_distances[i])
        if i in selection.person:
            same_person.append(candidate)
        else:
            decisions[candidate.index] = candidate.refuse("different_person")
    for candidate in copies:
        decisions[candidate.index] = scored(candidate, judges, None).refuse("near_duplicate")

    kept = sorted(same_person, key=lambda c: c.rank, reverse=True)
    held_out = None
    if len(kept) >= config.held_out_from:
        held = sorted(kept, key=reference_order, reverse=True)[1]  # the reference is the first
        kept.remove(held)
        decisions[held.index] = PhotoDecision(held.name, True, None, held.scores, held_out=True)
        held_out = HeldOut(held.name, held.face.embedding)
    selected = kept[: config.max_train_photos]
    for candidate in kept[config.max_train_photos :]:
        decisions[candidate.index] = candidate.refuse("not_needed")

    train: list[TrainingImage] = []
    for done, candidate in enumerate(selected, start=len(photos) + 1):
        cancel.raise_if_cancelled()
        decisions[candidate.index] = PhotoDecision(candidate.name, True, None, candidate.scores)
        image = cut_outs.get(candidate.name) if candidate.name in reused else None
        if image is None or image.size != candidate.crop.image.size:
            image = segment(restore(candidate.crop.image), candidate.crop.box)
        train.append(TrainingImage(candidate.name, image, candidate.face.embedding))
        progress(Progress("preprocess", done / steps, f"cropped {candidate.name}"))

    reference = None
    if selected:
        best = max(selected, key=reference_order)
        reference = ReferenceFace(best.name, best.crop)
    progress(Progress("preprocess", 1.0, "done"))
    return PreprocessResult(
        backend=analyzer.name,
        caption=config.caption,
        decisions=[decisions[index] for index in range(len(photos))],
        train=train,
        reference=reference,
        checks=checks,
        cut_key=key,
        held_out=held_out,
    )


def decision_json(decision: PhotoDecision) -> dict:
    """One photo's decision as persona.json and the command line show it."""
    scores = None
    if decision.scores is not None:
        scores = {key: None if value is None else round(value, 4) for key, value in asdict(decision.scores).items()}
    return {
        "name": decision.name,
        "accepted": decision.accepted,
        "reason": decision.reason,
        "message": decision.message,
        "scores": scores,
        "person": decision.person,
        "held_out": decision.held_out,
    }


def write_preprocessed(result: PreprocessResult, out_dir: str | Path) -> dict:
    """Write the folder described in the module docstring; returns persona.json's content.

    Training images of an earlier run in the same folder are removed first, so a rerun with
    fewer photos leaves none behind.
    """
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    for old in [*(out / "train").glob("*.png"), *(out / "train").glob("*.txt")]:
        old.unlink()
    train = []
    for rank, item in enumerate(result.train):
        stem = f"train/{rank:02d}"
        item.image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(result.caption + "\n", encoding="utf-8")
        train.append({"image": f"{stem}.png", "name": item.name, "embedding": item.embedding.tolist()})
    reference = None
    if result.reference is not None:
        crop = result.reference.crop
        crop.image.save(out / "reference.png")
        reference = {
            "name": result.reference.name,
            "image": "reference.png",
            "box": [round(v, 2) for v in crop.box],
            "keypoints": np.round(crop.keypoints.astype(float), 2).tolist(),
        }
    persona = {
        "version": 1,
        "backend": result.backend,
        "caption": result.caption,
        "cut_key": result.cut_key,
        "reference": reference,
        "train": train,
        "held_out": None if result.held_out is None else {
            "name": result.held_out.name, "embedding": result.held_out.embedding.tolist()
        },
        "photos": [decision_json(decision) for decision in result.decisions],
    }
    (out / "persona.json").write_text(json.dumps(persona, indent=1, ensure_ascii=False), encoding="utf-8")
    return persona


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photo_dir", type=Path, help="folder of one person's photos (every file is tried)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the training set into")
    parser.add_argument("--backend", choices=("dlib", "insightface"), default="dlib")
    parser.add_argument("--models", type=Path, default=None, help="model folder (required for insightface)")


def run(args: argparse.Namespace) -> dict:
    """Preprocess a folder; the summary leaves out embeddings (they are in persona.json)."""
    if not args.photo_dir.is_dir():
        raise FileNotFoundError(f"photo folder not found: {args.photo_dir}")
    photos = [
        (path.name, path.read_bytes())
        for path in sorted(args.photo_dir.iterdir())
        if path.is_file() and not path.name.startswith(".")
    ]
    result = preprocess(photos, load_face_analyzer(args.backend, args.models))
    persona = write_preprocessed(result, args.out)
    return {
        "out": str(args.out),
        "backend": persona["backend"],
        "reference": persona["reference"]["name"] if persona["reference"] else None,
        "train": [item["name"] for item in persona["train"]],
        "held_out": persona["held_out"]["name"] if persona["held_out"] else None,
        "people": result.people,
        "photos": persona["photos"],
    }
