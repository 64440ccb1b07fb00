"""Training folders that outlive a stopped build, so building the same double again resumes.

pipeline.train continues from OUT/resume.pt, the state of the last checkpoint. The site trains
into `TRAINING_DIR/persona-<id>-<fingerprint>/` on the worker's disk, where the fingerprint
covers everything that makes two runs the same run: the training set (the unpacked preprocessed
folder), the models (MODEL_DIR's manifest) and the training config. A build that stops (failed,
cancelled, its worker lost, a passing failure put back in line) leaves its folder behind, and
the next build of that double with the same fingerprint continues from its last checkpoint
instead of from step 0.

The folder holds face-derived data (LoRA weights, validation faces), so it goes as soon as it
is of no use: when the double is stored, when another fingerprint starts for the same double,
when the double is deleted (delete my data included; studio.signals), and in every worker's
maintenance round (`sweep`) for doubles that are gone or ready, and for stopped builds older
than TRAINING_RESUME_HOURS.
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

log = logging.getLogger(__name__)

_NAME = re.compile(r"^persona-(\d+)-[0-9a-f]{16}$")


def fingerprint(training_set: Path, config: dict, model_dir: Path) -> str:
    """A digest of every file of the training set (names and bytes), the config and the models' manifest."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    manifest = model_dir / "manifest.json"
    digest.update(manifest.read_bytes() if manifest.is_file() else b"no manifest")
    for path in sorted(p for p in training_set.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(training_set)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
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


def training_folder(persona_id: int, digest: str) -> Path:
    """This run's folder (kept from a stopped run with the same fingerprint); other runs' go."""
    folder = Path(settings.TRAINING_DIR) / f"persona-{persona_id}-{digest}"
    for _, stale in _folders(persona_id):
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def discard(persona_id: int) -> None:
    """Removes every training folder of a double on this machine."""
    for _, folder in _folders(persona_id):
        shutil.rmtree(folder, ignore_errors=True)


def sweep() -> int:
    """Removes folders of doubles that are gone or ready, and stopped builds past their time."""
    from studio.models import Persona

    building = (Persona.Status.QUEUED, Persona.Status.PREPROCESSING, Persona.Status.TRAINING, Persona.Status.VALIDATING)
    found = _folders()
    statuses = dict(Persona.objects.filter(pk__in=[pid for pid, _ in found]).values_list("pk", "status"))
    oldest = time.time() - settings.TRAINING_RESUME_HOURS * 3600
    removed = 0
    for persona_id, folder in found:
        status = statuses.get(persona_id)
        stale = status not in building and _last_written(folder) < oldest
        if status is None or status == Persona.Status.READY or stale:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the training folder %s (double %s)", folder.name, status or "deleted")
            removed += 1
    return removed


def _last_written(folder: Path) -> float:
    """The newest modification time in the folder (a checkpoint or the resume state)."""
    return max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
