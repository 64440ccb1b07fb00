"""studio.training_folders: which training folder a build uses, and when folders go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from django.urls import reverse

from studio import training_folders
from studio.models import Persona

pytestmark = pytest.mark.django_db(transaction=True)

CONFIG = {"caption": "a photo of phb person", "max_steps": 800}


@pytest.fixture
def training_set(tmp_path) -> Path:
    folder = tmp_path / "preprocessed"
    (folder / "crops").mkdir(parents=True)
    (folder / "persona.json").write_text('{"train": []}')
    (folder / "crops" / "1.png").write_bytes(b"crop one")
    return folder


def test_the_fingerprint_follows_photos_config_and_models(training_set, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    first = training_folders.fingerprint(training_set, CONFIG, models)
    assert training_folders.fingerprint(training_set, dict(CONFIG), models) == first
    assert training_folders.fingerprint(training_set, {**CONFIG, "max_steps": 400}, models) != first
    (models / "manifest.json").write_text('{"models": []}')
    with_manifest = training_folders.fingerprint(training_set, CONFIG, models)
    assert with_manifest != first
    (training_set / "crops" / "1.png").write_bytes(b"another crop")
    assert training_folders.fingerprint(training_set, CONFIG, models) != with_manifest


def test_a_new_fingerprint_replaces_the_old_folder(persona, training_dir):
    old = training_folders.training_folder(persona.pk, "0" * 16)
    (old / "resume.pt").write_bytes(b"state")
    assert training_folders.training_folder(persona.pk, "0" * 16) == old  # the same run: kept
    assert (old / "resume.pt").is_file()
    new = training_folders.training_folder(persona.pk, "1" * 16)
    assert not old.exists() and new.is_dir()


def test_deleting_my_data_removes_training_folders(owner, owner_client, persona, training_dir):
    folder = training_folders.training_folder(persona.pk, "0" * 16)
    (folder / "resume.pt").write_bytes(b"state")
    response = owner_client.post(reverse("delete_data"), {"confirm": "on"})
    assert response.status_code == 302
    assert not folder.exists()


def _aged_folder(persona_id: int, hours: float) -> Path:
    folder = training_folders.training_folder(persona_id, "0" * 16)
    resume = folder / "resume.pt"
    resume.write_bytes(b"state")
    then = time.time() - hours * 3600
    for path in (resume, folder):
        os.utime(path, (then, then))
    return folder


def test_sweep_keeps_only_folders_a_build_may_resume(owner, settings):
    settings.TRAINING_RESUME_HOURS = 24
    status = Persona.Status
    kept = {
        "recently failed": _aged_folder(Persona.objects.create(owner=owner, name="a", status=status.FAILED).pk, 1),
        "being built": _aged_folder(Persona.objects.create(owner=owner, name="b", status=status.TRAINING).pk, 48),
    }
    removed = {
        "failed long ago": _aged_folder(Persona.objects.create(owner=owner, name="c", status=status.CANCELLED).pk, 25),
        "ready": _aged_folder(Persona.objects.create(owner=owner, name="d", status=status.READY).pk, 1),
        "deleted": _aged_folder(987654, 1),
    }
    unrelated = settings.TRAINING_DIR / "notes"
    unrelated.mkdir()
    assert training_folders.sweep() == len(removed)
    assert all(folder.is_dir() for folder in kept.values())
    assert not any(folder.exists() for folder in removed.values())
    assert unrelated.is_dir()  # only folders named like the ones it makes


def test_sweep_without_a_training_folder_does_nothing(settings):
    assert not settings.TRAINING_DIR.exists()
    assert training_folders.sweep() == 0
