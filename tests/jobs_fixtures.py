"""Builders for job tests: a persona with five accepted photos, and one already built."""

from __future__ import annotations

import io
import os
from functools import cache
from pathlib import Path

from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from studio import jobs, services
from studio.models import Persona, Template

FACES = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "faces"))


@cache
def five_obamas() -> list[tuple[str, bytes]]:
    """Five different photos of one person, as (file name, JPEG bytes).

    shared/faces has four whole, different photos of Obama (the others are copies or cut
    through the face); the fifth is his face cut out of obama_and_biden.jpg, 0.25 or more
    from the other four by dlib's embedding, where near-duplicates lie within 0.12.
    """
    photos = [(name, (FACES / name).read_bytes()) for name in ("obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg")]
    buffer = io.BytesIO()
    Image.open(FACES / "obama_and_biden.jpg").crop((1002, 242, 1482, 722)).save(buffer, format="JPEG", quality=95)
    return [*photos, ("obama-beside-biden.jpg", buffer.getvalue())]


def persona_with_photos(owner, name: str = "Me") -> Persona:
    services.give_face_consent(owner)
    persona = Persona.objects.create(owner=owner, name=name)
    uploads = [SimpleUploadedFile(photo, data) for photo, data in five_obamas()]
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


def twelve_templates(owner) -> list[Template]:
    """Enough templates (three of each of four demo images) that a job still runs when a test acts on it."""
    return [template for _ in range(3) for template in demo_templates(owner, 4)]
