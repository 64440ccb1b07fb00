"""The optional learned swapper, loaded by insightface's own model_zoo from a tiny inswapper-shaped ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.generate import render_portraits
from pipeline.swapper import LearnedSwapper
from tests.pipeline.test_faces import save_model, write_tiny_insightface_pack
from tests.pipeline.test_generate import persona, persona_dir  # noqa: F401 (fixtures)


def write_tiny_swapper(path: Path, latent: int = 512) -> Path:
    """inswapper_128's interface: inputs "target" (1x3x128x128, RGB in 0..1) and "source" (1 x latent),
    one 1x3x128x128 output, and `emap` (latent x latent) as the last initializer. The output is the
    target's negative shifted by a colour the latent picks, so both inputs show in it."""
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.ones((1, 3, 128, 128), np.float32), "one"),
        numpy_helper.from_array(rng.standard_normal((latent, 3)).astype(np.float32), "colour"),
        numpy_helper.from_array(np.array([1, 3, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.eye(latent, dtype=np.float32), "emap"),
    ]
    nodes = [
        helper.make_node("Sub", ["one", "target"], ["negative"]),
        helper.make_node("MatMul", ["source", "colour"], ["picked"]),
        helper.make_node("Reshape", ["picked", "shape"], ["shift"]),
        helper.make_node("Add", ["negative", "shift"], ["shifted"]),
        helper.make_node("Sigmoid", ["shifted"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "inswapper_tiny",
        [
            helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
            helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, latent]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializer=initializers,
    )
    save_model(graph, path)
    return path


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_the_swapper_loads_through_insightfaces_model_zoo_and_redraws_the_face(tmp_path, face_photo, dlib_analyzer):
    swapper = LearnedSwapper(write_tiny_swapper(tmp_path / "inswapper_tiny.onnx"))
    assert swapper.embedding_size == 512
    image = np.asarray(face_photo("biden.jpg"))
    face = dlib_analyzer.analyze(face_photo("biden.jpg"))[0]
    rng = np.random.default_rng(1)
    one, other = (swapper.swap(image, face, unit(rng.standard_normal(512))) for _ in range(2))
    x0, y0, x1, y1 = (round(v) for v in face.box)
    assert np.abs(one[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1]).mean() > 20  # the face is redrawn
    assert np.abs(one.astype(int) - other).max() > 10  # by the identity it is given
    below = y1 + round(face.width)
    assert below < image.shape[0] and np.array_equal(one[below:], image[below:])  # far below the face: untouched
    with pytest.raises(ValueError, match="512-d identity embeddings, not 128-d"):
        swapper.swap(image, face, face.embedding)  # dlib's embedding


def test_a_model_of_another_shape_is_refused(tmp_path):
    write_tiny_insightface_pack(tmp_path)
    with pytest.raises(ValueError, match="not an inswapper-shaped model"):
        LearnedSwapper(tmp_path / "w600k_tiny.onnx")
    with pytest.raises(FileNotFoundError):
        LearnedSwapper(tmp_path / "missing.onnx")


def test_portraits_fuse_the_swappers_face_in_the_templates_tone(tmp_path, persona, face_photo, dlib_analyzer):
    """With a swapper the classic portrait is its redrawn face (a latent of dlib's 128-d here, so
    the whole render runs on real faces), through the same tone match and blend."""
    from pipeline.generate import analyse_template

    swapper = LearnedSwapper(write_tiny_swapper(tmp_path / "inswapper_tiny.onnx", latent=128))
    template = analyse_template(face_photo("biden.jpg"), dlib_analyzer)
    (plain,) = render_portraits(persona, [template], dlib_analyzer)
    (swapped,) = render_portraits(persona, [template], dlib_analyzer, swapper=swapper)
    assert np.abs(np.asarray(swapped.crop).astype(int) - np.asarray(plain.crop)).mean() > 1.0
    # Outside the fusion's mask the template is untouched either way.
    outside = np.asarray(swapped.masks.paste) == 0
    assert np.array_equal(np.asarray(swapped.crop)[outside], np.asarray(plain.crop)[outside])
