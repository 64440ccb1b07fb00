"""Builders for job tests: a persona with five accepted photos, and one already built."""

from __future__ import annotations

import os
from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile

from studio import jobs, services
from studio.models import Persona, Template

FACES = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "faces"))
FIVE_OBAMAS = ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg"]


def persona_with_photos(owner, name: str = "Me") -> Persona:
    services.give_face_consent(owner)
    persona = Persona.objects.create(owner=owner, name=name)
    uploads = [SimpleUploadedFile(photo, (FACES / photo).read_bytes()) for photo in FIVE_OBAMAS]
    assert services.add_photos(persona, uploads) == []
    return persona


def ready_persona(owner, name: str = "Me") -> Persona:
    persona = persona_with_photos(owner, name)
    job = services.request_training(persona)
    jobs.build_double(job.id)
    persona.refresh_from_db()
    assert persona.status == Persona.Status.READY
    return persona


def demo_templates(owner, count: int = 2) -> list[Template]:
    names = sorted(services.DEMO_TEMPLATES.glob("*.jpg"))[:count]
    return [services.create_template(path.stem, "demo", path.read_bytes(), uploaded_by=owner) for path in names]
