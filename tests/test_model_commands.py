"""manage.py check_models on an empty folder, on the tiny kit, and on a corrupted file."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from pipeline.tinykit import build_tiny_kit


def run_check(settings, folder, capsys):
    settings.MODEL_DIR = folder
    try:
        call_command("check_models")
        failed = None
    except CommandError as error:
        failed = str(error)
    return capsys.readouterr().out, failed


def test_empty_folder_names_each_missing_model_and_the_fix(settings, tmp_path, capsys):
    out, failed = run_check(settings, tmp_path, capsys)
    assert failed and "classic engine" in failed
    for name in ["canny", "openpose", "tile", "color"]:
        assert any(name in line and line.startswith("missing") for line in out.splitlines()), out
    assert "manage.py fetch_models" in out


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory):
    return build_tiny_kit(tmp_path_factory.mktemp("kit"))


def test_tiny_kit_is_ready(settings, tiny_kit, capsys):
    out, failed = run_check(settings, tiny_kit, capsys)
    assert failed is None, out
    assert "are ready" in out


def test_wrong_hash_is_reported_corrupt(settings, tiny_kit, tmp_path, capsys):
    import shutil

    kit = shutil.copytree(tiny_kit, tmp_path / "kit")
    weights = next((kit / "controlnet" / "tile").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    out, failed = run_check(settings, kit, capsys)
    assert failed
    assert any(line.startswith("corrupt") and "tile" in line for line in out.splitlines()), out
