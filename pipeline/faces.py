"""Face analysis behind one interface: detect, 5 keypoints, identity embedding.

Two backends return the same `Face` record, so preprocessing, validation and the portrait
stage never ask which one ran:

- `DlibFaceAnalyzer` (offline default, ships with pip): dlib's HOG detector, its 5- and
  68-point shape predictors and its 128-d ResNet embedding, from the `face_recognition_models`
  wheel.
- `InsightFaceAnalyzer` (production): insightface's own `FaceAnalysis` loading an
  operator-supplied pack such as buffalo_l (SCRFD detector + ArcFace recogniser) from a
  folder. buffalo_l's licence is non-commercial research only.

Keypoint order, both backends (insightface's ArcFace order, in image left/right terms):
left eye, right eye, nose tip, left mouth corner, right mouth corner.
Embeddings are float32 and L2-normalised, so distances between them lie in [0, 2] and
cosine similarity = 1 - distance**2 / 2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class FaceThresholds:
    """Numbers that depend on the backend's box shape and embedding space.

    Distances are L2 between unit embeddings. Sharpness is the variance of the Laplacian of
    the grey face box resized to 128x128; brightness its mean grey level (0..255).
    """

    same_person_distance: float
    near_duplicate_distance: float
    mirror_check_distance: float  # pairs closer than this are also compared with one face mirrored
    min_face_size: int  # face box width in the photo, pixels
    min_sharpness: float
    good_sharpness: float  # where the sharpness score saturates at 1
    min_brightness: float


# Measured by bench/selection.py on every pair of faces in ../shared/faces (unit-normalised dlib
# embeddings; dlib's raw vectors have norm ~1.4, so face_recognition's 0.6 raw tolerance is ~0.43
# here), faces labelled by its README, 4 people in 11 pictures, copies of a picture counted apiece:
#   one person, two pictures:  35 pairs (Obama, Biden, Alex Lacamoire)  0.220 - 0.360, median 0.261
#   two people:                77 pairs                                  0.475 - 0.698, median 0.592
# The limit lies in that gap: 0.40, 0.04 above the farthest same-person pair and 0.075 below the
# nearest stranger, nearer the same-person side because a stranger let in trains into the double
# while a photo wrongly refused costs one photo. The gap is this folder's, not the world's: dlib's
# published figure (not measured here) is 99.38% right on LFW at raw 0.6, so about 1 pair in 160
# lands on the wrong side of a fixed limit, and siblings or look-alikes can come closer than
# 0.40. Hence the vote in pipeline.preprocess.select_person: a stranger must lie within the limit
# of most of the person's photos, and a set of two people is shown to the person, not decided by
# one number.
# Copies of one picture (resized, letterboxed, re-encoded) lie 0.051-0.066 apart, a cut through the
# face 0.166-0.175; two different pictures of one person 0.220 or more -> near-duplicates at 0.12.
# A mirrored copy (9 pictures, each mirrored and re-encoded) lies 0.084-0.161 from the picture's
# embedding, either side of 0.12, but 0.021-0.068 from the picture's face crop mirrored, which lies
# 0.230 or more from the person's other pictures: so pairs closer than 0.20 (above every mirrored
# copy, below the closest two different pictures, 0.220) are compared mirrored too, which costs one
# more analysis of a 512-px crop only for such pairs.
# Face size: dlib's HOG window is 80 px, and below that a 512-px crop at box x3 is
# upscaled more than 2x. Sharpness: in-focus photos there measure 60-900, obama.jpg blurred
# with a Gaussian of radius 4 measures 11 -> 25; 200 is a typical sharp selfie. Brightness:
# real photos measure 100-150; obama.jpg darkened to 30% measures 44 -> 50.
DLIB_THRESHOLDS = FaceThresholds(
    same_person_distance=0.40,
    near_duplicate_distance=0.12,
    mirror_check_distance=0.20,
    min_face_size=80,
    min_sharpness=25.0,
    good_sharpness=200.0,
    min_brightness=50.0,
)

# NOT measured here: no ArcFace weights exist on the development machines, so these numbers come
# from common ArcFace practice, not from a distribution anyone here has seen. Verification
# commonly accepts cosine >= 0.35 (distance 1.14) as the same person; a re-encoded or re-cropped
# copy of one photo stays above cosine 0.9 (distance 0.45). Before they are trusted, run
# bench/selection.py's distributions with FACE_BACKEND=insightface on a deployment that has the pack
# and put the limit in the gap it shows. SCRFD's box takes in more forehead and chin than dlib's,
# so the image-quality numbers are dlib's.
INSIGHTFACE_THRESHOLDS = FaceThresholds(
    same_person_distance=1.14,
    near_duplicate_distance=0.45,
    mirror_check_distance=1.14,  # unmeasured, so every same-person pair is compared mirrored too
    min_face_size=80,
    min_sharpness=25.0,
    good_sharpness=200.0,
    min_brightness=50.0,
)


THRESHOLDS = {"dlib": DLIB_THRESHOLDS, "insightface": INSIGHTFACE_THRESHOLDS}

# The likeness a person sees: 0-100, LIKENESS_AT_LIMIT where the backend's same-person limit is,
# falling by as much again for each further limit's worth of distance (100 at distance 0, 0 at
# 2.5 limits). A raw cosine means different things per backend (two strangers score about 0.9
# with dlib, 0.1 with ArcFace); this reads the same for both.
LIKENESS_AT_LIMIT = 60.0


def likeness(similarity: float, thresholds: FaceThresholds) -> float:
    """The cosine similarity of two unit embeddings as the 0-100 likeness shown to people."""
    distance = math.sqrt(max(0.0, 2.0 - 2.0 * similarity))
    score = 100.0 - (100.0 - LIKENESS_AT_LIMIT) * distance / thresholds.same_person_distance
    return min(100.0, max(0.0, score))


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in the pixel coordinates of the analysed image."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float  # detector confidence: dlib's HOG SVM margin, SCRFD's probability
    keypoints: np.ndarray  # (5, 2) float32, order in the module docstring
    embedding: np.ndarray  # (d,) float32, unit L2 norm
    # (68, 2) float32, dlib's 68-point layout, from both backends (pipeline.fusion warps by them);
    # None only in analyses stored before every backend gave them.
    landmarks: np.ndarray | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


class FaceAnalyzer(Protocol):
    """What every backend offers; `analyze` returns faces largest first."""

    name: str
    thresholds: FaceThresholds
    embedding_size: int
    model_id: str  # which weights: results of one set are never taken for another's

    def analyze(self, image: Image.Image) -> list[Face]: ...


def model_files_id(name: str, files: Sequence[Path]) -> str:
    """The backend's name with a digest of its model files' names and sizes (a swapped pack differs)."""
    digest = hashlib.sha256("".join(f"{path.name}:{path.stat().st_size}\n" for path in sorted(files)).encode())
    return f"{name}-{digest.hexdigest()[:12]}"


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    return vector / np.linalg.norm(vector)


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


# Where dlib's HOG detector puts its box around a face, in units of the distance from the eyes'
# midpoint to the mouth's, from the mean of the five keypoints: (left, top, right, bottom). The mean
# over the 16 faces dlib finds in ../shared/faces (spread 0.12-0.18); dlib's 68-point predictor was
# trained on such boxes, so another detector's face is given one before the predictor runs.
HOG_BOX_FROM_KEYPOINTS = (-1.2, -1.22, 1.15, 1.11)


def hog_box(keypoints: np.ndarray) -> tuple[float, float, float, float]:
    """The box dlib's detector would give a face with these five keypoints (HOG_BOX_FROM_KEYPOINTS)."""
    eyes, mouth = keypoints[:2].mean(axis=0), keypoints[3:5].mean(axis=0)
    unit = float(np.linalg.norm(mouth - eyes))
    cx, cy = keypoints.mean(axis=0)
    left, top, right, bottom = HOG_BOX_FROM_KEYPOINTS
    return (cx + left * unit, cy + top * unit, cx + right * unit, cy + bottom * unit)


def face_recognition_models_dir() -> Path:
    """The `models/` folder of the face_recognition_models wheel.

    Found without importing the package: its `__init__` needs `pkg_resources`, which the
    setuptools that torch pulls in no longer has.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face_recognition_models is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibFaceAnalyzer:
    """dlib HOG detection, 68-point landmarks and the 128-d ResNet embedding.

    Detection runs on a copy whose long side is at most `detect_long_side` (HOG time grows
    with pixels; selfie faces stay far above the 80-px window). If that finds nothing, it
    runs once more with dlib's 2x upsampling, which finds faces down to ~40 px in the copy
    (small photos such as a 320x240 crop, or a small face in a big photo). Landmarks and the
    embedding use the full-resolution photo. The embedding aligns on the 5-point model, as
    dlib's and face_recognition's reference pipeline does (the thresholds were measured so);
    the 5 keypoints come from the 68 points because the 5-point model has no mouth corners.

    One analysis at a time: dlib's detector and predictors keep scratch state per object, and
    two threads in them at once (two uploads on one web server) crash the whole process.
    """

    name = "dlib"
    thresholds = DLIB_THRESHOLDS
    embedding_size = 128

    def __init__(self, model_dir: str | Path | None = None, detect_long_side: int = 800) -> None:
        import dlib

        folder = Path(model_dir) if model_dir else face_recognition_models_dir()
        files = {
            "sp5": folder / "shape_predictor_5_face_landmarks.dat",
            "sp68": folder / "shape_predictor_68_face_landmarks.dat",
            "resnet": folder / "dlib_face_recognition_resnet_model_v1.dat",
        }
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"dlib model file missing: {path}")
        self.model_id = model_files_id(self.name, list(files.values()))
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape5 = dlib.shape_predictor(str(files["sp5"]))
        self._shape68 = dlib.shape_predictor(str(files["sp68"]))
        self._encoder = dlib.face_recognition_model_v1(str(files["resnet"]))
        self.detect_long_side = detect_long_side
        self._lock = threading.Lock()

    def analyze(self, image: Image.Image) -> list[Face]:
        with self._lock:
            return self._analyze(image)

    def _analyze(self, image: Image.Image) -> list[Face]:
        pixels = _rgb_array(image)
        scale = min(1.0, self.detect_long_side / max(image.size))
        small = image
        if scale < 1.0:
            small = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        small_pixels = _rgb_array(small)
        rects, scores, _ = self._detector.run(small_pixels, 0, 0.0)
        if not rects:
            rects, scores, _ = self._detector.run(small_pixels, 1, 0.0)
        faces = [self._describe(pixels, rect, score, scale) for rect, score in zip(rects, scores)]
        return sorted(faces, key=lambda face: face.width * face.height, reverse=True)

    def _describe(self, pixels: np.ndarray, rect, score: float, scale: float) -> Face:
        dlib = self._dlib
        full = dlib.rectangle(
            round(rect.left() / scale),
            round(rect.top() / scale),
            round(rect.right() / scale),
            round(rect.bottom() / scale),
        )
        shape68 = self._shape68(pixels, full)
        points = np.array([(p.x, p.y) for p in shape68.parts()], dtype=np.float32)
        keypoints = np.stack(
            [
                points[36:42].mean(axis=0),  # eye on the image's left
                points[42:48].mean(axis=0),
                points[30],  # nose tip
                points[48],  # mouth corner on the image's left
                points[54],
            ]
        )
        embedding = self._encoder.compute_face_descriptor(pixels, self._shape5(pixels, full))
        return Face(
            box=(float(full.left()), float(full.top()), float(full.right()), float(full.bottom())),
            score=float(score),
            keypoints=keypoints,
            embedding=_unit(np.array(embedding)),
            landmarks=points,
        )


class InsightFaceAnalyzer:
    """insightface's `FaceAnalysis` on a model pack folder (buffalo_l or alike).

    insightface routes each `.onnx` in the folder by its shapes (>= 5 outputs: SCRFD
    detector; square input >= 112: ArcFace recogniser) and picks ArcFace's input
    normalisation from its first node names (Sub/Mul: normalised inside the graph).
    Only detection and recognition load: the attribute and 3D-landmark models would cost
    time for nothing we use. The 68 landmarks that face fusion warps by come from dlib's 68-point
    predictor (it ships with pip, in face_recognition_models), run on the box dlib's own detector
    would give the SCRFD keypoints (`hog_box`): packs differ in whether they carry a dense
    landmark model (buffalo_l's 2d106det has another layout), and one layout keeps fusion single.
    """

    name = "insightface"
    thresholds = INSIGHTFACE_THRESHOLDS
    embedding_size = 512  # ArcFace (buffalo_l's w600k_r50)

    def __init__(
        self,
        model_dir: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        det_size: tuple[int, int] = (640, 640),
    ) -> None:
        from insightface.app import FaceAnalysis

        folder = Path(model_dir).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"insightface model folder not found: {folder}")
        self.model_id = model_files_id(self.name, list(folder.glob("*.onnx")))
        self._app = FaceAnalysis(
            name=str(folder),
            root=str(folder.parent),
            allowed_modules=["detection", "recognition"],
            providers=list(providers),
        )
        if "recognition" not in self._app.models:
            raise ValueError(f"no recognition model (square input >= 112) in {folder}")
        if not self._app.det_model.use_kps:
            raise ValueError(f"the detector in {folder} gives no keypoints (needs 9 or 15 outputs)")
        self._app.prepare(ctx_id=0, det_size=det_size)
        import dlib

        self._dlib = dlib
        self._shape68 = dlib.shape_predictor(str(face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"))
        self._lock = threading.Lock()  # dlib's predictor is not thread-safe (see DlibFaceAnalyzer)

    def analyze(self, image: Image.Image) -> list[Face]:
        pixels = _rgb_array(image)
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])
        faces = []
        for found in self._app.get(bgr):
            keypoints = np.asarray(found.kps, dtype=np.float32)
            x0, y0, x1, y1 = (round(v) for v in hog_box(keypoints))
            with self._lock:
                shape = self._shape68(pixels, self._dlib.rectangle(x0, y0, x1, y1))
            faces.append(
                Face(
                    box=tuple(float(v) for v in found.bbox[:4]),
                    score=float(found.det_score),
                    keypoints=keypoints,
                    embedding=_unit(found.embedding),
                    landmarks=np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32),
                )
            )
        return sorted(faces, key=lambda face: face.width * face.height, reverse=True)


def load_face_analyzer(backend: str, model_dir: str | Path | None = None) -> FaceAnalyzer:
    """Build the named backend; `model_dir` is required for insightface (no downloads)."""
    if backend == "dlib":
        return DlibFaceAnalyzer(model_dir)
    if backend == "insightface":
        if model_dir is None:
            raise ValueError("the insightface backend needs a model folder (--models)")
        return InsightFaceAnalyzer(model_dir)
    raise ValueError(f"unknown face backend {backend!r}: use 'dlib' or 'insightface'")


def largest_face_embeddings(analyzer: FaceAnalyzer, images: Sequence[Image.Image]) -> np.ndarray:
    """One identity embedding per image, of its largest face; a zero row where none is found.

    This is the embedder training scores its validation faces with (a zero row scores 0).
    """
    rows = []
    for image in images:
        faces = analyzer.analyze(image.convert("RGB"))
        rows.append(faces[0].embedding if faces else np.zeros(analyzer.embedding_size, np.float32))
    return np.stack(rows)
