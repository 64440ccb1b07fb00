"""The admin for staff: people's files as names, not links only their owner may open; scores rounded."""

from __future__ import annotations

import pytest
from django.urls import reverse

from studio.models import Persona, Photo, Portrait

pytestmark = pytest.mark.django_db


@pytest.fixture
def persona(owner) -> Persona:
    persona = Persona.objects.create(owner=owner, name="Me", identity_score=0.9985783100128174)
    persona.lora_file.name = f"users/{owner.pk}/personas/lora.safetensors"
    persona.save()
    return persona


@pytest.mark.parametrize("model", ["persona", "photo", "portrait"])
def test_a_persons_files_show_as_names_not_links(staff_client, persona, model):
    photo = Photo.objects.create(persona=persona, image=f"users/{persona.owner_id}/photos/selfie.jpg")
    portrait = Portrait.objects.create(persona=persona, image=f"users/{persona.owner_id}/portraits/p.jpg",
                                       identity_similarity=0.71234)
    row = {"persona": persona, "photo": photo, "portrait": portrait}[model]
    page = staff_client.get(reverse(f"admin:studio_{model}_change", args=[row.pk])).content.decode()
    stored = {"persona": "lora.safetensors", "photo": "selfie.jpg", "portrait": "p.jpg"}[model]
    assert stored in page
    assert "/media/" not in page and 'type="file"' not in page


def test_scores_are_listed_to_two_places(staff_client, persona):
    Portrait.objects.create(persona=persona, image="users/1/portraits/p.jpg", identity_similarity=0.71234)
    personas = staff_client.get(reverse("admin:studio_persona_changelist")).content.decode()
    assert '<td class="field-identity">1.00</td>' in personas and "0.9985783100128174" not in personas
    portraits = staff_client.get(reverse("admin:studio_portrait_changelist")).content.decode()
    assert '<td class="field-identity">0.71</td>' in portraits and "0.71234" not in portraits


@pytest.mark.parametrize("model", ["persona", "photo", "portrait"])
def test_staff_cannot_add_a_persons_rows(staff_client, model):
    """Such a row would have no file: its owner's pages would fail on it."""
    assert staff_client.get(reverse(f"admin:studio_{model}_add")).status_code == 403
    assert staff_client.post(reverse(f"admin:studio_{model}_add"), {"name": "x"}).status_code == 403


def test_a_photo_stays_with_its_double(staff_client, persona, owner):
    photo = Photo.objects.create(persona=persona, image=f"users/{owner.pk}/photos/selfie.jpg")
    other = Persona.objects.create(owner=owner, name="Other")
    url = reverse("admin:studio_photo_change", args=[photo.pk])
    staff_client.post(url, {"persona": other.pk, "status": "accepted", "reason_code": "", "analysis": "{}",
                            "original_name": "selfie.jpg"})
    photo.refresh_from_db()
    assert photo.persona == persona and photo.status == "accepted"
