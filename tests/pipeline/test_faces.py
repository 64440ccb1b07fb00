"""Face analysis on real photos (dlib) and through insightface's real loader (tiny ONNX pack)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pipeline.faces import Face, InsightFaceAnalyzer, hog_box, load_face_analyzer


@pytest.fixture(scope="module")
def faces_of(dlib_analyzer, face_photo):
    """dlib's analysis of a shared photo, computed once per module."""

    @lru_cache(maxsize=None)
    def analyse(name: str) -> tuple[Face, ...]:
        return tuple(dlib_analyzer.analyze(face_photo(name)))

    return analyse


def assert_face_record(face: Face, image: Image.Image, embedding_size: int) -> None:
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    assert face.keypoints.shape == (5, 2) and face.keypoints.dtype == np.float32
    left_eye, right_eye, nose, left_mouth, right_mouth = face.keypoints
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert face.embedding.shape == (embedding_size,) and face.embedding.dtype == np.float32
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)


def test_dlib_gives_box_keypoints_landmarks_and_unit_embedding(faces_of, face_photo):
    faces = faces_of("obama.jpg")
    assert len(faces) == 1
    face = faces[0]
    assert_face_record(face, face_photo("obama.jpg"), 128)
    assert face.landmarks is not None and face.landmarks.shape == (68, 2)
    x0, y0, x1, y1 = face.box
    assert ((face.keypoints >= (x0, y0)) & (face.keypoints <= (x1, y1))).all()


def test_dlib_finds_the_face_in_a_small_photo(faces_of, face_photo):
    assert face_photo("obama_small.jpg").size == (320, 240)
    assert len(faces_of("obama_small.jpg")) == 1


def test_dlib_reports_every_face_largest_first(faces_of):
    faces = faces_of("two_people.jpg")
    assert len(faces) == 2
    assert faces[0].width * faces[0].height >= faces[1].width * faces[1].height


def test_dlib_thresholds_separate_people_and_copies(faces_of, dlib_analyzer):
    def distance(a: str, b: str) -> float:
        return float(np.linalg.norm(faces_of(a)[0].embedding - faces_of(b)[0].embedding))

    limits = dlib_analyzer.thresholds
    assert distance("obama.jpg", "obama-480p.jpg") < limits.near_duplicate_distance
    assert limits.near_duplicate_distance < distance("obama.jpg", "obama3.jpg") < limits.same_person_distance
    assert distance("obama.jpg", "biden.jpg") > limits.same_person_distance


THREADED_ANALYSES = """
import json, sys, threading
from pathlib import Path
from PIL import Image
from pipeline.faces import load_face_analyzer

analyzer = load_face_analyzer("dlib")
photos = {name: Image.open(Path(sys.argv[1]) / name).convert("RGB") for name in sys.argv[2:]}
boxes = {}

def analyse_all(thread):
    for round in range(2):
        for name, photo in photos.items():
            boxes[f"{thread}:{round}:{name}"] = [face.box for face in analyzer.analyze(photo)]

threads = [threading.Thread(target=analyse_all, args=(thread,)) for thread in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(boxes))
"""


def test_dlib_analyses_from_several_threads_at_once(faces_of, faces_dir):
    """One analyzer serves every request thread of the web server; before its lock, two uploads
    at once crashed the whole process (segmentation fault), hence a separate process here."""
    names = ["alex_lacamoire1.jpg", "biden.jpg", "biden2.jpg", "obama-480p.jpg"]
    child = subprocess.run(
        [sys.executable, "-c", THREADED_ANALYSES, str(faces_dir), *names],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
    )
    assert child.returncode == 0, child.stderr[-2000:]
    boxes = json.loads(child.stdout)
    expected = {name: [list(face.box) for face in faces_of(name)] for name in names}
    assert boxes == {
        f"{thread}:{round}:{name}": expected[name] for thread in range(8) for round in range(2) for name in names
    }


def write_tiny_insightface_pack(folder: Path) -> None:
    """A buffalo_l-shaped pack that insightface's router must recognise by shapes alone.

    det_tiny.onnx: SCRFD layout with keypoints, 9 outputs in insightface's order (scores,
    then boxes, then keypoints, each for strides 8/16/32; 2 anchors per cell) on a fixed
    128x128 input. Its outputs are constants: one stride-32 anchor (cell row 2, column 2,
    centre 64,64) scores 0.9 with a box one stride wide on every side and five keypoints
    laid out like a face; every other anchor scores 0.
    w600k_tiny.onnx: a 112x112 recogniser, global average pool -> 3x512 linear map.
    """
    side, strides = 128, (8, 16, 32)
    hit = (2 * (side // 32) + 2) * 2
    face_at_hit = {
        "score": [0.9],
        "bbox": [1.0, 1.0, 1.0, 1.0],
        "kps": [-0.35, -0.25, 0.35, -0.25, 0.0, 0.05, -0.3, 0.4, 0.3, 0.4],
    }
    nodes, outputs = [], []
    for kind, values in face_at_hit.items():
        for stride in strides:
            tensor = np.zeros(((side // stride) ** 2 * 2, len(values)), np.float32)
            if stride == 32:
                tensor[hit] = values
            name = f"{kind}_{stride}"
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(tensor)))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(tensor.shape)))
    image_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])
    save_model(helper.make_graph(nodes, "scrfd_tiny", [image_input], outputs), folder / "det_tiny.onnx")

    weights = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "weights"], ["fc1"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_tiny",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 512])],
        initializer=[numpy_helper.from_array(weights, "weights")],
    )
    save_model(graph, folder / "w600k_tiny.onnx")


def save_model(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by every onnxruntime the project may meet
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface 2.1 calls a deprecated skimage API
def test_insightface_backend_loads_a_pack_through_face_analysis(tmp_path, face_photo):
    write_tiny_insightface_pack(tmp_path)
    analyzer = load_face_analyzer("insightface", tmp_path)
    assert isinstance(analyzer, InsightFaceAnalyzer)
    image = face_photo("obama_small.jpg")
    faces = analyzer.analyze(image)
    assert len(faces) == 1
    assert_face_record(faces[0], image, 512)
    assert faces[0].score == pytest.approx(0.9)
    # Dense landmarks for fusion, from dlib's predictor on the box dlib would give these keypoints:
    # on this tiny pack's made-up face the predictor's mean shape lands around its keypoints.
    landmarks = faces[0].landmarks
    assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
    eyes = np.stack([landmarks[36:42].mean(axis=0), landmarks[42:48].mean(axis=0)])
    x0, _, x1, _ = hog_box(faces[0].keypoints)
    assert np.linalg.norm(eyes - faces[0].keypoints[:2], axis=1).max() < 0.25 * (x1 - x0)


@pytest.mark.parametrize("name", ["obama.jpg", "biden.jpg", "alex-lacamoire.png", "lin-manuel-miranda.png"])
def test_landmarks_from_keypoints_alone_match_dlibs_own(name, faces_of, face_photo, dlib_analyzer):
    """What the insightface backend does for its landmarks (the predictor on `hog_box` of the
    detector's keypoints) gives, on real faces, the landmarks dlib's own detector box gives."""
    face = faces_of(name)[0]
    box = hog_box(face.keypoints)
    x0, y0, x1, y1 = face.box
    overlap = max(0, min(x1, box[2]) - max(x0, box[0])) * max(0, min(y1, box[3]) - max(y0, box[1]))
    union = (x1 - x0) * (y1 - y0) + (box[2] - box[0]) * (box[3] - box[1]) - overlap
    assert overlap / union > 0.75
    pixels = np.asarray(face_photo(name))
    shape = dlib_analyzer._shape68(pixels, dlib_analyzer._dlib.rectangle(*(round(v) for v in box)))
    landmarks = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
    error = np.linalg.norm(landmarks - face.landmarks, axis=1).mean()
    assert error < 0.03 * np.linalg.norm(face.landmarks[16] - face.landmarks[0])


def test_load_face_analyzer_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError):
        load_face_analyzer("mediapipe")
    with pytest.raises(ValueError):
        load_face_analyzer("insightface")
    with pytest.raises(FileNotFoundError):
        load_face_analyzer("insightface", tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_face_analyzer("dlib", tmp_path)
