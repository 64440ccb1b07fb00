"""Deleting one digital double: its photos, jobs, portraits and files go; nothing else of the person's."""

from __future__ import annotations

from pathlib import Path

import django_rq
import pytest
from django.db import models
from django.test import Client
from django.urls import reverse

from studio import jobs, services
from studio.models import Job, Persona, Photo, Portrait
from tests.jobs_fixtures import demo_templates, persona_with_photos

pytestmark = pytest.mark.django_db(transaction=True)


def files_of(persona: Persona) -> list[Path]:
    rows = [persona, *persona.photos.all(), *persona.portraits.all()]
    return [Path(stored.path) for row in rows for field in row._meta.concrete_fields
            if isinstance(field, models.FileField) and (stored := getattr(row, field.attname))]


def delete(client: Client, persona: Persona, confirm: bool = True, follow: bool = True):
    return client.post(reverse("persona_delete", args=[persona.id]), {"confirm": "on"} if confirm else {},
                       follow=follow)


def test_the_owner_deletes_a_double_with_everything_made_from_it(owner, owner_client):
    persona = persona_with_photos(owner, "Kept photos")
    jobs.build_double(services.request_training(persona, keep_photos=True).id)
    persona.refresh_from_db()
    jobs.make_portraits(services.request_portraits(persona, demo_templates(owner, 1)).id)
    waiting = services.request_portraits(persona, demo_templates(owner, 1))
    waiting_on_queue = Job.objects.get(pk=waiting.pk).rq_job_id
    other = persona_with_photos(owner, "Another")
    other_job = services.request_training(other)  # waits: one job per person at a time
    assert waiting_on_queue in django_rq.get_queue("gpu").job_ids and not Job.objects.get(pk=other_job.pk).rq_job_id
    files = files_of(persona)
    assert len(files) == 5 * 2 + 2 + 2 and all(path.is_file() for path in files)  # photos, double, portrait

    response = delete(owner_client, persona)

    assert response.redirect_chain[-1][0] == reverse("home")
    assert "“Kept photos”, its photos and its portraits are deleted." in response.content.decode()
    assert not Persona.objects.filter(pk=persona.pk).exists()
    assert not Job.objects.filter(persona_id=persona.pk).exists() and not Portrait.objects.filter(persona_id=persona.pk).exists()
    assert not any(path.exists() for path in files)
    assert waiting_on_queue not in django_rq.get_queue("gpu").job_ids
    # The person's other double is untouched, and its waiting build now has its turn.
    assert Photo.objects.filter(persona=other).count() == 5
    assert Job.objects.get(pk=other_job.pk).rq_job_id in django_rq.get_queue("gpu").job_ids


def test_nothing_is_deleted_without_the_box_ticked(owner, owner_client):
    persona = persona_with_photos(owner)
    response = delete(owner_client, persona, confirm=False)
    assert response.redirect_chain[-1][0] == reverse("persona", args=[persona.id])
    assert "Nothing was deleted: tick the box to confirm." in response.content.decode()
    assert Persona.objects.filter(pk=persona.pk).exists() and persona.photos.count() == 5


def test_a_double_is_not_deleted_while_something_is_made_from_it(owner, owner_client):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING)
    response = delete(owner_client, persona)
    assert "Something is being made from this double right now." in response.content.decode()
    assert Persona.objects.filter(pk=persona.pk).exists() and persona.photos.count() == 5


def test_another_person_gets_404_and_a_visitor_the_login_page(owner, other_client):
    persona = persona_with_photos(owner)
    assert delete(other_client, persona, follow=False).status_code == 404
    anonymous = delete(Client(), persona, follow=False)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("login"))
    assert other_client.get(reverse("persona_delete", args=[persona.id])).status_code == 405  # POST only
    assert Persona.objects.filter(pk=persona.pk).exists() and persona.photos.count() == 5
