"""The admin for staff: people's files as names, not links only their owner may open; scores rounded."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from studio.models import Persona, Photo, Portrait

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("staff", "staff@example.com", "x", is_staff=True, is_superuser=True))
    return client


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
    assert "1.00" in personas and "0.9985783100128174" not in personas
    portraits = staff_client.get(reverse("admin:studio_portrait_changelist")).content.decode()
    assert "0.71" in portraits and "0.71234" not in portraits
