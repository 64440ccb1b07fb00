"""studio.training_folders: which training folder a build uses, and when folders go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from studio import services, training_folders
from studio.models import Persona
from tests.jobs_fixtures import FACES

pytestmark = pytest.mark.django_db(transaction=True)

RUN = {"training_set": "users/1/personas/a.zip", "config": {"max_steps": 800}, "face_models": "dlib-0123"}


def test_the_fingerprint_follows_what_decides_the_run_and_the_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    first = training_folders.fingerprint(RUN, models)
    assert training_folders.fingerprint(dict(reversed(RUN.items())), models) == first
    for changed in ({"training_set": "users/1/personas/b.zip"}, {"config": {"max_steps": 400}}, {"face_models": "x"}):
        assert training_folders.fingerprint({**RUN, **changed}, models) != first
    (models / "manifest.json").write_text('{"models": []}')
    assert training_folders.fingerprint(RUN, models) != first


def test_a_new_fingerprint_replaces_the_old_folder(persona, training_dir):
    old = training_folders.training_folder(persona.pk, "0" * 16, "a.zip")
    (old / "resume.pt").write_bytes(b"state")
    assert training_folders.training_folder(persona.pk, "0" * 16, "a.zip") == old  # the same run: kept
    assert (old / "resume.pt").is_file()
    new = training_folders.training_folder(persona.pk, "1" * 16, "b.zip")
    assert not old.exists() and new.is_dir()


def test_deleting_my_data_removes_training_folders(owner, owner_client, persona, training_dir):
    folder = training_folders.training_folder(persona.pk, "0" * 16, "a.zip")
    (folder / "resume.pt").write_bytes(b"state")
    response = owner_client.post(reverse("delete_data"), {"confirm": "on"})
    assert response.status_code == 302
    assert not folder.exists()


def _aged_folder(persona: Persona | int, hours: float) -> Path:
    """A stopped build's folder, last written `hours` ago, trained from the double's photos."""
    persona_id = persona if isinstance(persona, int) else persona.pk
    training_set = "" if isinstance(persona, int) else persona.preprocessed.name
    folder = training_folders.training_folder(persona_id, "0" * 16, training_set)
    then = time.time() - hours * 3600
    (folder / "resume.pt").write_bytes(b"state")
    for path in (*folder.iterdir(), folder):
        os.utime(path, (then, then))
    return folder


def _double(owner, status: str, training_set: str = "users/1/personas/a.zip") -> Persona:
    return Persona.objects.create(owner=owner, name=status, status=status, preprocessed=training_set)


def test_sweep_keeps_only_folders_a_build_may_resume(owner, settings):
    settings.TRAINING_RESUME_HOURS = 24
    status = Persona.Status
    kept = {
        "recently failed": _aged_folder(_double(owner, status.FAILED), 1),
        "being built": _aged_folder(_double(owner, status.TRAINING), 48),
    }
    photos_changed = _double(owner, status.CANCELLED)
    removed = {
        "failed long ago": _aged_folder(_double(owner, status.CANCELLED), 25),
        "ready": _aged_folder(_double(owner, status.READY), 1),
        "deleted": _aged_folder(987654, 1),
        "photos changed": _aged_folder(photos_changed, 1),
    }
    Persona.objects.filter(pk=photos_changed.pk).update(preprocessed="users/1/personas/new.zip")
    unrelated = settings.TRAINING_DIR / "notes"
    unrelated.mkdir()
    assert training_folders.sweep() == len(removed)
    assert all(folder.is_dir() for folder in kept.values())
    assert not any(folder.exists() for folder in removed.values())
    assert unrelated.is_dir()  # only folders named like the ones it makes


def test_changing_the_photos_removes_a_stopped_builds_folder(owner, owner_client, persona, training_dir):
    services.give_face_consent(owner)
    folder = training_folders.training_folder(persona.pk, "0" * 16, "old.zip")
    upload = SimpleUploadedFile("more.jpg", (FACES / "obama.jpg").read_bytes())
    owner_client.post(reverse("photo_upload", args=[persona.pk]), {"photos": [upload]})
    assert persona.photos.count() == 1 and not folder.exists()


def test_sweep_without_a_training_folder_does_nothing(settings):
    assert not settings.TRAINING_DIR.exists()
    assert training_folders.sweep() == 0
