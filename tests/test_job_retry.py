"""A failure the person saw stays until they act on it, with a Retry that runs the same job again
(issue 26): owner / other person / anonymous, portraits rendered once, what "acting on it" is."""

from __future__ import annotations

from datetime import timedelta

import django_rq
import pytest
from django.template.loader import render_to_string
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from studio import jobs, services
from studio.models import Job, Persona, Portrait
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona

# Committed rows: a retry dispatches on commit, and a run beats from a thread of its own.
pytestmark = pytest.mark.django_db(transaction=True)

HTMX = {"HX-Request": "true"}
WHY = "Something went wrong on our side."  # jobs.FAILED_UNEXPECTEDLY, as the person reads it


def failed_build(owner, monkeypatch) -> Job:
    """A build that failed as a build fails (its run raised), of a double that can be built again."""
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    django_rq.get_queue("gpu").empty()  # as a worker takes it

    def broken() -> str:
        raise RuntimeError("the engine could not be chosen")

    with monkeypatch.context() as patched:
        patched.setattr(services, "diffusion_engine_or_classic", broken)
        with pytest.raises(RuntimeError):
            jobs.build_double(job.pk)
    job.refresh_from_db()
    assert (job.status, job.error_for_person, job.persona.status) == ("failed", jobs.FAILED_UNEXPECTEDLY, "failed")
    return job


def failed_portraits(persona: Persona, templates, monkeypatch, stored: int) -> Job:
    """A portrait job whose run failed after storing `stored` of its templates' portraits."""
    job = services.request_portraits(persona, templates)
    django_rq.get_queue("gpu").empty()
    save = services.save_portrait
    calls = []

    def fails_after(job, template, *args, **kwargs):
        calls.append(template)
        if len(calls) > stored:
            raise RuntimeError("the disk is full")
        return save(job, template, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(services, "save_portrait", fails_after)
        with pytest.raises(RuntimeError):
            jobs.make_portraits(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_for_person == jobs.FAILED_UNEXPECTEDLY
    assert Portrait.objects.filter(job=job).count() == stored
    return job


def a_failed_job(persona: Persona, **fields) -> Job:
    """A failed build row, as a run leaves it."""
    return Job.objects.create(
        persona=persona, kind=Job.Kind.TRAIN, status=Job.Status.FAILED, finished=timezone.now(),
        error_for_person=jobs.FAILED_UNEXPECTEDLY, error_detail="Traceback …", **fields,
    )


def test_retry_and_dismiss_are_the_owners_alone(owner, owner_client, other_client, persona):
    job = a_failed_job(persona)
    for name in ("job_retry", "job_dismiss"):
        url = reverse(name, args=[job.pk])
        assert other_client.post(url).status_code == 404
        assert other_client.post(url, headers=HTMX).status_code == 404
        anonymous = Client().post(url)
        assert anonymous.status_code == 302 and anonymous["Location"] == f"{reverse('login')}?next={url}"
        assert owner_client.get(url).status_code == 405
        assert Client().get(url).status_code == 302  # to the login page first
    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.dismissed_at) == ("failed", None)
    assert reverse("job_dismiss", args=[job.pk]) in owner_client.get(reverse("home")).content.decode()


def test_a_failed_build_shows_retry_at_once_and_runs_the_same_job_again(owner, owner_client, monkeypatch):
    pushed = []
    send = services._send
    monkeypatch.setattr(services, "_send", lambda owner_id, template, context: pushed.append(
        render_to_string(template, context)) or send(owner_id, template, context))
    job = failed_build(owner, monkeypatch)
    # The fragment pushed to the person's open pages when it failed offers to try again.
    failed = [html for html in pushed if f'id="job-{job.pk}"' in html][-1]
    assert WHY in failed and reverse("job_retry", args=[job.pk]) in failed
    assert reverse("job_dismiss", args=[job.pk]) in failed

    response = owner_client.post(reverse("job_retry", args=[job.pk]), headers=HTMX)

    assert response.status_code == 200
    fragment = response.content.decode()
    assert fragment.startswith(f'<div id="job-{job.pk}"') and "Waiting" in fragment and WHY not in fragment
    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.error_for_person, row.error_detail, row.finished) == ("queued", "", "", None)
    assert row.persona.status == "queued"
    assert django_rq.get_queue("gpu").job_ids == [row.rq_job_id]  # dispatched as a new job is
    assert Job.objects.filter(persona=row.persona).count() == 1
    jobs.build_double(job.pk)
    assert Job.objects.get(pk=job.pk).status == "succeeded"
    assert Persona.objects.get(pk=job.persona_id).status == "ready"


def test_retrying_failed_portraits_renders_only_the_missing_ones(owner, owner_client, monkeypatch):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 3)
    job = failed_portraits(persona, templates, monkeypatch, stored=2)
    home = owner_client.get(reverse("home")).content.decode()
    assert WHY in home and reverse("job_retry", args=[job.pk]) in home

    response = owner_client.post(reverse("job_retry", args=[job.pk]), follow=True)

    assert "“Make portraits” is back in line." in response.content.decode()  # no JavaScript: a message
    assert Job.objects.get(pk=job.pk).status == "queued"
    rendered = []
    render = jobs.render_portraits
    monkeypatch.setattr(jobs, "render_portraits", lambda subject, faces, *a, **k: rendered.append(len(faces)) or
                        render(subject, faces, *a, **k))
    jobs.make_portraits(job.pk)
    assert Job.objects.get(pk=job.pk).status == "succeeded" and rendered == [1]
    stored = list(Portrait.objects.filter(persona=persona).values_list("job_id", "template_id"))
    assert sorted(stored) == sorted((job.pk, template.pk) for template in templates)  # one each, none twice
    assert WHY not in owner_client.get(reverse("home")).content.decode()


def test_a_failure_stays_past_a_day_until_the_person_acts_on_it(owner, owner_client, persona):
    job = a_failed_job(persona)
    Job.objects.filter(pk=job.pk).update(finished=timezone.now() - timedelta(days=30))
    assert services.panel_jobs(owner) == [job]
    for page in ("home", "jobs_panel", "album"):
        assert WHY in owner_client.get(reverse(page)).content.decode(), page


def test_dismissing_a_failure_puts_it_away_on_every_page(owner, owner_client, persona, monkeypatch):
    job = a_failed_job(persona)
    other = a_failed_job(Persona.objects.create(owner=owner, name="Another"))
    pushed = []
    monkeypatch.setattr(services, "_send", lambda owner_id, template, context: pushed.append(
        render_to_string(template, context)) or True)

    response = owner_client.post(reverse("job_dismiss", args=[job.pk]), headers=HTMX)

    assert response.status_code == 200
    fragment = response.content.decode()
    assert f'id="job-{job.pk}"' in fragment and " hidden" in fragment and WHY not in fragment
    # The person's other open pages drop it too.
    assert any(f'id="job-{job.pk}"' in html and "hidden" in html and 'hx-swap-oob="true"' in html for html in pushed)
    assert Job.objects.get(pk=job.pk).dismissed_at is not None
    assert services.panel_jobs(owner) == [other]
    # Without JavaScript: back to the page, which says so.
    page = owner_client.post(reverse("job_dismiss", args=[other.pk]), follow=True).content.decode()
    assert "“Build digital double” is removed from your jobs." in page and WHY not in page
    assert services.panel_jobs(owner) == []
    assert Job.objects.get(pk=other.pk).status == "failed"  # put away, not changed


def test_retry_when_the_same_portraits_already_wait_answers_with_those(owner, owner_client, monkeypatch):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 2)
    first = failed_portraits(persona, templates, monkeypatch, stored=1)
    second = Job.objects.create(
        persona=persona, kind=Job.Kind.GENERATE, templates_key=first.templates_key, status=Job.Status.FAILED,
        finished=timezone.now(), error_for_person=jobs.FAILED_UNEXPECTEDLY,
    )
    second.templates.set(templates)
    assert services.retry_failed_job(first) == first  # the older one, tried again from another tab

    response = owner_client.post(reverse("job_retry", args=[second.pk]), headers=HTMX)

    assert response.status_code == 200
    assert response.headers["HX-Retarget"] == "#jobs" and response.headers["HX-Reswap"] == "outerHTML"
    panel = response.content.decode()
    assert "“Make portraits” is already on its way." in panel
    assert f'id="job-{first.pk}"' in panel and f'id="job-{second.pk}"' not in panel
    assert Job.objects.get(pk=second.pk).status == "failed"  # not a second job for the same portraits
    assert Job.objects.get(pk=second.pk).dismissed_at is not None  # answered: it leaves the panel
    assert list(Job.objects.filter(status__in=Job.ACTIVE)) == [first]
    assert services.panel_jobs(owner) == [first]


def test_retry_of_a_build_while_the_double_is_being_built_answers_with_that_build(owner, owner_client, monkeypatch):
    job = failed_build(owner, monkeypatch)
    building = services.request_training(job.persona)  # asked again from the double's page

    page = owner_client.post(reverse("job_retry", args=[job.pk]), follow=True).content.decode()

    assert "“Build digital double” is already on its way." in page
    assert list(Job.objects.filter(status__in=Job.ACTIVE)) == [building]
    assert Job.objects.get(pk=job.pk).status == "failed"


def test_retry_clicked_twice_is_one_run(owner, owner_client, monkeypatch):
    job = failed_build(owner, monkeypatch)
    for _ in range(2):
        response = owner_client.post(reverse("job_retry", args=[job.pk]), headers=HTMX)
        fragment = response.content.decode()
        assert response.status_code == 200 and "Waiting" in fragment and 'role="alert"' not in fragment
    assert list(Job.objects.filter(status__in=Job.ACTIVE)) == [job]
    assert len(django_rq.get_queue("gpu").job_ids) == 1


def test_no_retry_when_trying_again_cannot_help(owner, owner_client, monkeypatch):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 1)
    job = failed_portraits(persona, templates, monkeypatch, stored=0)
    assert reverse("job_retry", args=[job.pk]) in owner_client.get(reverse("home")).content.decode()
    job.templates.all().delete()  # staff deleted its templates since

    home = owner_client.get(reverse("home")).content.decode()
    assert WHY in home and reverse("job_retry", args=[job.pk]) not in home
    assert reverse("job_dismiss", args=[job.pk]) in home  # it can still be put away
    response = owner_client.post(reverse("job_retry", args=[job.pk]), headers=HTMX)
    assert "The templates you chose were taken out of the gallery." in response.content.decode()
    assert Job.objects.get(pk=job.pk).status == "failed"
    # A build of a double whose photos are no longer enough: added photos come first.
    build = a_failed_job(Persona.objects.create(owner=owner, name="No photos", status=Persona.Status.FAILED))
    page = owner_client.post(reverse("job_retry", args=[build.pk]), follow=True).content.decode()
    assert "Add at least 5 good photos first." in page
    assert Job.objects.get(pk=build.pk).status == "failed"
    # A cancelled job is not a failure to try again: the person stopped it.
    cancelled = services.request_portraits(persona, demo_templates(owner, 1))
    services.cancel_job(cancelled)
    page = owner_client.post(reverse("job_retry", args=[cancelled.pk]), follow=True).content.decode()
    assert "Only a job that failed can be tried again." in page
    assert Job.objects.get(pk=cancelled.pk).status == "cancelled"


def test_a_retry_racing_the_same_request_is_answered_with_it(owner, monkeypatch):
    """The same build asked for between the retry's look and its update (another tab): the
    database refuses a second waiting build (one_active_job_per_request), and the retry answers
    with the one asked for."""
    job = failed_build(owner, monkeypatch)
    building = services.request_training(job.persona)
    looks = []
    look = services._same_request_active
    monkeypatch.setattr(services, "_same_request_active", lambda job: look(job) if looks.append(job) or len(looks) > 1
                        else None)  # the first look comes before the other tab's request

    assert services.retry_failed_job(job) == building

    assert list(Job.objects.filter(status__in=Job.ACTIVE)) == [building]
    row = Job.objects.get(pk=job.pk)
    assert row.status == "failed" and row.dismissed_at is not None
