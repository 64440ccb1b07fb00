"""Fixtures for the pipeline tests: the real face photos and a shared dlib analyser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.faces import DlibFaceAnalyzer


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """../shared/faces beside the repository (see its README); PHOTOBOOTH_FACES_DIR overrides."""
    default = Path(__file__).resolve().parents[2].parent / "shared" / "faces"
    folder = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", default))
    if not (folder / "obama.jpg").is_file():
        pytest.fail(f"face photos not found in {folder}; set PHOTOBOOTH_FACES_DIR")
    return folder


@pytest.fixture(scope="session")
def face_photo(faces_dir: Path):
    """Opens one of the shared photos as RGB by file name."""

    def open_photo(name: str) -> Image.Image:
        return Image.open(faces_dir / name).convert("RGB")

    return open_photo


@pytest.fixture(scope="session")
def dlib_analyzer() -> DlibFaceAnalyzer:
    """Loading dlib's models takes about a second: load them once per test run."""
    return DlibFaceAnalyzer()


@pytest.fixture
def compiled_norm_calls(monkeypatch) -> list[int]:
    """Counts the calls of pipeline/compiling.py's compiled GroupNorm while a test uses it."""
    from pipeline import compiling

    calls: list[int] = []
    compiled = compiling.compiled_group_norm()

    def counted(*args, **kwargs):
        calls.append(1)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(compiling, "compiled_group_norm", lambda: counted)
    return calls
