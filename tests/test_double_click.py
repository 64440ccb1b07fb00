"""A double click is one job even when the requests arrive at the same instant: threads, each with
its own database connection, post the same form together, on the suite's database (SQLite, or
PostgreSQL with DATABASE_URL, as CI runs it)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from studio.models import Job
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona

# Committed rows: each thread's connection must see the persona and the others' jobs.
pytestmark = pytest.mark.django_db(transaction=True)

CLICKS = 4


def post_at_once(owner, url: str, form: dict) -> list[int]:
    """Posts `form` from CLICKS threads released together by a barrier; returns the statuses."""
    clients = []
    for _ in range(CLICKS):
        client = Client()
        client.force_login(owner)
        clients.append(client)
    barrier = threading.Barrier(CLICKS)
    statuses: list[int] = []
    errors: list[BaseException] = []

    def click(client: Client) -> None:
        try:
            barrier.wait(timeout=30)
            statuses.append(client.post(url, form).status_code)
        except BaseException as error:  # reported below: a thread's exception would vanish
            errors.append(error)
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=click, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return statuses


def test_the_same_portraits_asked_at_once_are_one_job(owner):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 2)
    form = {"persona": persona.id, "templates": [template.id for template in templates]}

    statuses = post_at_once(owner, reverse("portraits_request"), form)

    assert statuses == [302] * CLICKS  # every click answered "on their way", none a 500
    assert Job.objects.filter(persona=persona, kind=Job.Kind.GENERATE).count() == 1


def test_build_clicked_at_once_is_one_build(owner):
    persona = persona_with_photos(owner)

    statuses = post_at_once(owner, reverse("persona_build", args=[persona.id]), {})

    assert statuses == [302] * CLICKS
    assert Job.objects.filter(persona=persona, kind=Job.Kind.TRAIN).count() == 1
