"""Fixtures shared by the training and model tests: a tiny kit built in a temporary folder.

Imported by the test modules (conftest.py belongs to another part of the suite). CPU tests run
on one thread: with two, step times swing from 0.06 s to 9 s on shared machines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.tinykit import build_tiny_kit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory) -> Path:
    return build_tiny_kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="module")
def photos(faces_dir: Path) -> list[Image.Image]:
    """Three 64 px crops of one person (faces_dir comes from tests/pipeline/conftest.py)."""
    names = ("obama.jpg", "obama1.jpg", "obama2.jpg")
    return [Image.open(faces_dir / n).convert("RGB").resize((64, 64)) for n in names]
