"""Training folders that outlive a stopped build, so building the same double again resumes.

pipeline.train continues from OUT/resume.pt, the state of the last checkpoint. The site trains
into `TRAINING_DIR/persona-<id>-<fingerprint>/` on the worker's disk, where the fingerprint
covers everything that makes two runs the same run: the training set (the stored preprocessed
archive, which gets a new name whenever the photos change), the training config, the diffusion
models (MODEL_DIR's manifest), the face models that score validation and the validation
templates. A build that stops (failed, cancelled, its worker lost, a passing failure put back in
line) leaves its folder behind, and the next build of that double with the same fingerprint
continues from its last checkpoint instead of from step 0.

The folder holds face-derived data (LoRA weights, validation faces), so it goes as soon as it
is of no use: when the double is stored, when its photos change or it is deleted (delete my
data included; studio.services and studio.signals, on the machine where that happens), when
another fingerprint starts for the same double, and in every worker's maintenance round
(`sweep`) for doubles that are gone, ready or re-analysed, and for stopped builds older than
TRAINING_RESUME_HOURS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

from django.conf import settings

from studio.models import Persona

log = logging.getLogger(__name__)

_NAME = re.compile(r"^persona-(\d+)-[0-9a-f]{16}$")
TRAINING_SET_FILE = "training-set.txt"  # the stored archive the folder was trained from


def fingerprint(inputs: dict, model_dir: Path) -> str:
    """A digest of what decides a run (JSON-able `inputs`) and of the diffusion models' manifest."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    manifest = model_dir / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    return digest.hexdigest()[:16]


def _folders(persona_id: int | None = None) -> list[tuple[int, Path]]:
    root = Path(settings.TRAINING_DIR)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and persona_id in (None, int(match.group(1))):
            found.append((int(match.group(1)), path))
    return found


def training_folder(persona_id: int, digest: str, training_set: str) -> Path:
    """This run's folder (kept from a stopped run with the same fingerprint); other runs' go.

    `training_set` (the stored archive's name) is written into it for `sweep`."""
    folder = Path(settings.TRAINING_DIR) / f"persona-{persona_id}-{digest}"
    for _, stale in _folders(persona_id):
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRAINING_SET_FILE).write_text(training_set, encoding="utf-8")
    return folder


def discard(persona_id: int) -> None:
    """Removes every training folder of a double on this machine."""
    for _, folder in _folders(persona_id):
        shutil.rmtree(folder, ignore_errors=True)


def sweep() -> int:
    """Removes the folders no build will resume; returns how many. Each double is read just
    before its folder is judged, so a build that starts meanwhile keeps its folder."""
    building = (Persona.Status.QUEUED, Persona.Status.PREPROCESSING, Persona.Status.TRAINING, Persona.Status.VALIDATING)
    oldest = time.time() - settings.TRAINING_RESUME_HOURS * 3600
    removed = 0
    for persona_id, folder in _folders():
        persona = Persona.objects.filter(pk=persona_id).values("status", "preprocessed").first()
        try:
            if persona is not None and persona["status"] in building:
                continue
            why = _useless(folder, persona, oldest)
        except OSError:  # removed meanwhile by a delete, a new build or another worker's sweep
            continue
        if why:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the training folder %s: %s", folder.name, why)
            removed += 1
    return removed


def _useless(folder: Path, persona: dict | None, oldest: float) -> str | None:
    """Why a stopped build's folder can go, or None while a build of its double may resume it."""
    if persona is None:
        return "its double was deleted"
    if persona["status"] == Persona.Status.READY:
        return "its double is stored"
    trained_from = folder / TRAINING_SET_FILE
    if trained_from.is_file() and trained_from.read_text(encoding="utf-8") != persona["preprocessed"]:
        return "its double's photos changed"
    if max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime) < oldest:
        return f"stopped more than {settings.TRAINING_RESUME_HOURS} h ago"
    return None
