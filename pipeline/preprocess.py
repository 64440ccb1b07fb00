"""Selfies in, training set out: check every photo, pick the best, crop them for training.

Steps (EasyPhoto's preprocessing plus an image-quality score and readable refusals):

1. Per photo: decode (JPEG, PNG, HEIC...; a bounded number of progressive scans), upright
   by EXIF orientation when it can be read, detect faces.
   Refuse with a reason code: not_an_image, no_face, multiple_faces (a second face at least
   `background_face_ratio` as wide as the largest; smaller ones are people in the
   background), face_cut_off (more than `max_face_outside` of the face box lies outside the
   photo: half a face trains half a double), face_too_small, too_dark, too_blurry (checked
   after darkness because a dark face also has little contrast). Score the rest: angle
   `(90 - |eye-line angle|) / 90`, quality = sharpness x exposure x size scores, each 0..1.
2. Identity: the centre is the mean embedding of the photos close to the medoid (the photo
   nearest to all others), so one stranger's photo cannot pull the centre towards itself as
   it would pull EasyPhoto's plain mean. Photos farther than the backend's same-person
   distance from it are refused as different_person; similarity = cosine to the centre.
3. Near-duplicates (embeddings closer than the backend's near-duplicate distance): the one
   with the lower similarity x quality goes. The top `max_train_photos` by similarity x
   quality are selected; the rest are refused as not_needed. The reference face is the
   selected photo with the best angle x similarity.
4. Selected photos are cropped around the face (box x `crop_scale`, square, `crop_size` px),
   passed through the restoration hook, and the person is cut onto white by the segmenter
   hook (default: OpenCV GrabCut seeded by the face box and a body rectangle; offline and
   model-free, good enough to remove most of a background, not hair-exact).
5. What step 1 found for each photo (`PhotoCheck`: the face, its scores or the refusal) comes
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
     "photos": [{"name", "accepted", "reason", "message", "scores"}, ...]}

`reason` is a code (null when accepted), `message` its English text for people (translate
with gettext), `scores` the fields of `PhotoScores`, or null when the photo was refused
before one face was measured.
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
from pipeline.faces import Face, FaceAnalyzer, load_face_analyzer

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


@dataclass(frozen=True)
class PhotoScores:
    face_size: float  # face box width in the photo, pixels
    sharpness: float  # variance of the Laplacian, grey face box at 128x128
    brightness: float  # mean grey level of the face box, 0..255
    angle: float  # (90 - |eye-line angle in degrees|) / 90
    quality: float  # sharpness x exposure x size scores, 0..1
    similarity: float | None = None  # cosine to the persona's centre, once known


@dataclass(frozen=True)
class PhotoDecision:
    name: str
    accepted: bool
    reason: str | None  # a REASONS key; None when accepted
    scores: PhotoScores | None  # None when refused before one face was measured

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
    face: Face | None
    scores: PhotoScores | None  # similarity not set: it depends on the other photos

    def to_json(self) -> dict:
        face = self.face
        return {
            "key": self.key,
            "reason": self.reason,
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
        return cls(data["key"], data["reason"], face, scores)


# Part of every check's key: raise it when check_photo decides differently, so stored checks
# are redone rather than trusted.
CHECK_VERSION = 2


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
class PreprocessResult:
    backend: str
    caption: str
    decisions: list[PhotoDecision]  # in input order
    train: list[TrainingImage]  # best first
    reference: ReferenceFace | None
    checks: list[PhotoCheck]  # in input order: what a later run may reuse
    cut_key: str  # how the training images were cut: a later run reuses them when its own is the same


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

    def refuse(self, reason: str) -> PhotoDecision:
        return PhotoDecision(self.name, False, reason, self.scores)


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


def inspect_photo(image: Image.Image, analyzer: FaceAnalyzer, config: PreprocessConfig) -> PhotoCheck:
    """Detection, embedding and the per-photo refusals of a decoded photo."""
    key = check_key(analyzer, config)
    faces = analyzer.analyze(image)
    if not faces:
        return PhotoCheck(key, "no_face", None, None)
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
            return PhotoCheck(key, reason, face, scores)
    return PhotoCheck(key, None, face, scores)


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
    return Candidate(index, name, check.face, check.scores, crop_around_face(image, check.face, config)), check


def identity_centre(embeddings: np.ndarray, same_person_distance: float) -> np.ndarray:
    """Unit mean of the embeddings within `same_person_distance` of the medoid."""
    distances = np.linalg.norm(embeddings[:, None, :] - embeddings[None, :, :], axis=-1)
    medoid = int(np.argmin(distances.sum(axis=1)))
    centre = embeddings[distances[medoid] <= same_person_distance].mean(axis=0)
    return centre / np.linalg.norm(centre)


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
    same_person: list[Candidate] = []
    if candidates:
        centre = identity_centre(np.stack([c.face.embedding for c in candidates]), limits.same_person_distance)
        for candidate in candidates:
            similarity = float(candidate.face.embedding @ centre)
            candidate = replace(candidate, scores=replace(candidate.scores, similarity=similarity))
            if math.sqrt(max(0.0, 2.0 - 2.0 * similarity)) > limits.same_person_distance:
                decisions[candidate.index] = candidate.refuse("different_person")
            else:
                same_person.append(candidate)

    kept: list[Candidate] = []
    for candidate in sorted(same_person, key=lambda c: c.rank, reverse=True):
        if any(
            np.linalg.norm(candidate.face.embedding - other.face.embedding) < limits.near_duplicate_distance
            for other in kept
        ):
            decisions[candidate.index] = candidate.refuse("near_duplicate")
        else:
            kept.append(candidate)
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
        best = max(selected, key=lambda c: c.scores.angle * c.scores.similarity)
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
        "photos": persona["photos"],
    }
