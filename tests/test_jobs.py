"""Building doubles and portraits through studio.jobs, in this process, on real Redis and photos."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import timedelta
from pathlib import Path

import django_rq
import redis
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import OperationalError
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify
from PIL import Image
from rq.job import JobStatus

from pipeline.common import Cancelled, Progress
from studio import jobs, services
from studio.models import Job, Persona, Photo, Portrait
from studio.templatetags.studio import job_state
from tests.jobs_fixtures import FACES, demo_templates, persona_with_photos, ready_persona

pytestmark = pytest.mark.django_db(transaction=True)




def queued_ids() -> list[str]:
    return django_rq.get_queue("gpu").job_ids


def test_classic_double_keeps_crops_and_deletes_selfies(owner):
    persona = persona_with_photos(owner)
    selfie_files = [photo.image.path for photo in persona.photos.all()]
    job = services.request_training(persona)
    assert queued_ids() == [job.rq_job_id for job in [Job.objects.get(pk=job.pk)]]
    jobs.build_double(job.id)
    persona.refresh_from_db()
    job.refresh_from_db()
    assert (persona.status, persona.engine, job.status, job.progress) == ("ready", "classic", "succeeded", 1.0)
    assert persona.reference_face and Path(persona.reference_face.path).is_file()
    assert 0.8 < persona.identity_score <= 1.0
    assert not Photo.objects.filter(persona=persona).exists()
    assert not any(Path(path).exists() for path in selfie_files)
    assert persona.preprocessed and Path(persona.preprocessed.path).is_file()


def test_keep_my_photos_keeps_them_on_the_ready_page_to_delete_one_by_one(owner, owner_client, other_client):
    persona = persona_with_photos(owner)
    services.add_photos(persona, [SimpleUploadedFile("biden.jpg", (FACES / "biden.jpg").read_bytes())])
    refused = persona.photos.get(status=Photo.Status.REJECTED)
    jobs.build_double(services.request_training(persona, keep_photos=True).id)
    assert persona.photos.count() == 5 and not persona.photos.filter(pk=refused.pk).exists()
    assert not Path(refused.image.path).exists()  # not part of the double: not kept
    page = owner_client.get(reverse("persona", args=[persona.id])).content.decode()
    assert "Your kept original photos" in page
    photo = persona.photos.first()
    assert reverse("photo_delete", args=[photo.id]) in page
    assert f'<span class="file-name" title="{photo.original_name}">{photo.original_name}</span>' in page
    persona.refresh_from_db()
    built_from = persona.preprocessed.name
    assert other_client.post(reverse("photo_delete", args=[photo.id])).status_code == 404
    response = owner_client.post(reverse("photo_delete", args=[photo.id]), follow=True)
    assert "The original photo is deleted." in response.content.decode()
    assert not Path(photo.image.path).exists() and persona.photos.count() == 4
    persona.refresh_from_db()
    assert persona.status == "ready" and persona.preprocessed.name == built_from  # the double is as it was


def test_building_twice_leaves_one_set_of_files(owner):
    persona = ready_persona(owner)
    first_reference = persona.reference_face.path
    persona.status = Persona.Status.FAILED  # as if the person retried
    persona.save()
    persona.keep_photos = True
    jobs.build_double(Job.objects.create(persona=persona, kind=Job.Kind.TRAIN).id)
    persona.refresh_from_db()
    assert not Path(first_reference).exists()
    assert Path(persona.reference_face.path).is_file()


def test_training_needs_enough_photos(owner):
    persona = Persona.objects.create(owner=owner, name="Empty")
    with pytest.raises(services.NotAllowed, match="Add at least 5 good photos first"):
        services.request_training(persona)


def test_portraits_land_in_the_album(owner, owner_client, other_client):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 2)
    job = services.request_portraits(persona, templates)
    jobs.make_portraits(job.id)
    job.refresh_from_db()
    portraits = list(Portrait.objects.filter(persona=persona))
    assert job.status == "succeeded" and len(portraits) == 2
    assert {p.template_id for p in portraits} == {t.id for t in templates}
    assert all(p.identity_similarity is not None and p.identity_similarity > 0.8 for p in portraits)
    assert all(p.held_out_similarity is None for p in portraits)  # 5 photos: all of them trained
    assert all(Image.open(p.thumbnail).size == (288, 384) for p in portraits)  # the album's 3:4 cards

    album = owner_client.get(reverse("album")).content.decode()
    assert all(reverse("portrait", args=[p.id]) in album for p in portraits)
    download = owner_client.get(reverse("portrait_download", args=[portraits[0].id]))
    assert download["Content-Disposition"].startswith("attachment")
    archive = zipfile.ZipFile(io.BytesIO(b"".join(owner_client.get(reverse("album_zip", args=[persona.id])).streaming_content)))
    # Named after the double and the template: "me-official-portrait-3.jpg".
    assert download["Content-Disposition"].endswith(f'filename="{portraits[0].file_name}"')
    assert portraits[0].file_name == f"me-{slugify(portraits[0].template.title)}-{portraits[0].id}.jpg"
    assert sorted(archive.namelist()) == sorted(p.file_name for p in portraits)
    for url in [reverse("portrait", args=[portraits[0].id]), reverse("portrait_download", args=[portraits[0].id]),
                reverse("album_zip", args=[persona.id]), reverse("media_file", args=[portraits[0].image.name]),
                reverse("media_file", args=[portraits[0].thumbnail.name])]:
        assert other_client.get(url).status_code == 404, url
    assert other_client.post(reverse("portrait_delete", args=[portraits[0].id])).status_code == 404
    assert other_client.post(reverse("album_delete", args=[persona.id])).status_code == 404

    unticked = owner_client.post(reverse("portrait_delete", args=[portraits[0].id]), follow=True)
    assert "Nothing was deleted: tick the box to confirm." in unticked.content.decode()
    assert Path(portraits[0].image.path).exists()
    owner_client.post(reverse("portrait_delete", args=[portraits[0].id]), {"confirm": "on"})
    assert not Path(portraits[0].image.path).exists()
    unticked = owner_client.post(reverse("album_delete", args=[persona.id]), follow=True)
    assert "Nothing was deleted: tick the box to confirm." in unticked.content.decode()
    assert Portrait.objects.filter(persona=persona).count() == 1
    deleted = owner_client.post(reverse("album_delete", args=[persona.id]), {"confirm": "on"}, follow=True)
    assert f"1 portrait of {persona.name} is deleted." in deleted.content.decode()
    assert not Portrait.objects.filter(persona=persona).exists()


@pytest.mark.parametrize(
    ("typical_s", "progress", "words"),
    [(4, 0.0, "Rendering portraits Less than a minute left."), (600, 0.5, "Rendering portraits About 5 minutes left.")],
)
def test_a_running_job_says_how_long_is_left_from_recent_durations(owner, typical_s, progress, words):
    persona = Persona.objects.create(owner=owner, name="Me", status=Persona.Status.READY)
    now = timezone.now()
    Job.objects.create(owner=owner, persona=persona, kind=Job.Kind.GENERATE, status=Job.Status.SUCCEEDED,
                       started=now - timedelta(seconds=typical_s), finished=now)
    running = Job.objects.create(owner=owner, persona=persona, kind=Job.Kind.GENERATE, status=Job.Status.RUNNING,
                                 stage="portrait", progress=progress, started=now)
    assert job_state(running) == words


def test_portraits_are_measured_against_the_photo_kept_out_of_training(owner, settings):
    """With enough photos one is held out: never trained on nor fused, and each portrait's likeness
    is measured against it as well as against the reference."""
    settings.HELD_OUT_FROM = 5
    persona = persona_with_photos(owner)
    (held,) = [photo for photo in persona.photos.all() if photo.analysis["held_out"]]
    jobs.build_double(services.request_training(persona).id)
    persona.refresh_from_db()
    with zipfile.ZipFile(persona.preprocessed.open("rb")) as archive:
        record = json.loads(archive.read("persona.json"))
    assert record["held_out"]["name"] == str(held.id)
    assert str(held.id) not in [item["name"] for item in record["train"]] + [record["reference"]["name"]]
    job = services.request_portraits(persona, demo_templates(owner, 1))
    jobs.make_portraits(job.id)
    (portrait,) = Portrait.objects.filter(job=job)
    # Another photo of the same person: alike, though less than to the reference fused in.
    assert portrait.likeness >= 60 and portrait.held_out_similarity < portrait.identity_similarity
    assert portrait.copy_paste > 0


def test_portraits_need_a_ready_double(owner):
    persona = persona_with_photos(owner)
    with pytest.raises(services.NotAllowed, match="not ready"):
        services.request_portraits(persona, demo_templates(owner, 1))


def test_cancel_while_queued_removes_it_from_the_queue(owner):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    assert queued_ids() == [Job.objects.get(pk=job.pk).rq_job_id]
    services.cancel_job(Job.objects.get(pk=job.pk))
    job.refresh_from_db()
    persona.refresh_from_db()
    assert job.status == "cancelled" and persona.status == "cancelled"
    assert queued_ids() == []
    jobs.build_double(job.id)  # a stale worker pick-up does nothing
    assert Job.objects.get(pk=job.pk).status == "cancelled"


def test_one_person_at_a_time_on_the_queue(owner, other_user):
    mine = ready_persona(owner, "Mine")
    theirs = ready_persona(other_user, "Theirs")
    templates = demo_templates(owner, 1)
    django_rq.get_queue("gpu").empty()  # the finished builds' entries
    my_jobs = [services.request_portraits(mine, demo_templates(owner, 1)) for _ in range(10)]
    their_job = services.request_portraits(theirs, templates)
    rq_ids = {job.id: Job.objects.get(pk=job.id).rq_job_id for job in [*my_jobs, their_job]}
    assert queued_ids() == [rq_ids[my_jobs[0].id], rq_ids[their_job.id]]
    django_rq.get_queue("gpu").remove(rq_ids[my_jobs[0].id])  # as a worker takes it
    jobs.make_portraits(my_jobs[0].id)  # finishing one puts the person's next at the back
    assert queued_ids()[-1] == Job.objects.get(pk=my_jobs[1].id).rq_job_id
    assert queued_ids()[0] == rq_ids[their_job.id]


def test_failed_job_explains_and_allows_retry(owner, owner_client):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    persona.preprocessed.delete(save=True)  # the build cannot read its photos
    # The build's own error goes on to RQ, which keeps its traceback for staff (/admin/rq/).
    with pytest.raises(ValueError, match="The 'preprocessed' attribute has no file associated with it."):
        jobs.build_double(job.id)
    job.refresh_from_db()
    persona.refresh_from_db()
    assert job.status == "failed" and job.error_for_person == jobs.FAILED_UNEXPECTEDLY
    assert "Traceback" in job.error_detail
    assert persona.status == "failed"
    # Why stays readable after a reload (the jobs panel), until the person asks again.
    for page in (reverse("persona", args=[persona.id]), reverse("home"), reverse("album")):
        assert "Something went wrong on our side." in owner_client.get(page).content.decode(), page
    Job.objects.create(persona=persona, kind=Job.Kind.TRAIN)
    assert "Something went wrong on our side." not in owner_client.get(reverse("home")).content.decode()


def test_job_lost_by_its_worker_is_failed(owner, settings):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    stale = timezone.now() - timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT_S + 1)
    Job.objects.filter(pk=job.pk).update(status="running", heartbeat=stale)
    assert services.recover_abandoned_jobs() == 1
    job.refresh_from_db()
    assert job.status == "failed" and job.error_for_person == services.WORKER_LOST
    assert Persona.objects.get(pk=persona.pk).status == "failed"


def test_delete_all_data_leaves_nothing(owner, owner_client):
    persona = ready_persona(owner)
    jobs.make_portraits(services.request_portraits(persona, demo_templates(owner, 1)).id)
    services.request_portraits(persona, demo_templates(owner, 1))  # still queued
    folder = Path(settings.MEDIA_ROOT) / "users" / str(owner.id)
    assert any(folder.rglob("*"))
    response = owner_client.post(reverse("delete_data"), {"confirm": "on", "delete_account": "on"})
    assert response.status_code == 302
    assert not folder.exists(), list(folder.rglob("*"))
    assert not Persona.objects.exists() and not Job.objects.exists() and not Portrait.objects.exists()
    assert queued_ids() == []
    assert not type(owner).objects.filter(pk=owner.pk).exists()


def test_delete_data_needs_confirmation(owner_client, owner):
    persona = persona_with_photos(owner)
    response = owner_client.post(reverse("delete_data"), {})
    assert response.status_code == 400
    assert "Tick the box to confirm." in response.content.decode()
    assert Persona.objects.filter(pk=persona.pk).exists()


def test_cancel_view_owner_other_anonymous(owner, owner_client, other_client):
    job = services.request_training(persona_with_photos(owner))
    assert other_client.post(reverse("job_cancel", args=[job.pk])).status_code == 404
    assert Client().post(reverse("job_cancel", args=[job.pk])).status_code == 302
    assert Job.objects.get(pk=job.pk).status == "queued"
    response = owner_client.post(reverse("job_cancel", args=[job.pk]), {"next": "https://evil.example/"})
    assert response["Location"] == reverse("home")
    assert Job.objects.get(pk=job.pk).status == "cancelled"
    assert "“Build digital double” is cancelled." in owner_client.get(reverse("home")).content.decode()


def test_build_submitted_twice_queues_one_job(owner, owner_client):
    persona = persona_with_photos(owner)
    build = {"keep_photos": "on"}  # so that it could be asked again once built
    first = owner_client.post(reverse("persona_build", args=[persona.pk]), build, follow=True)
    again = owner_client.post(reverse("persona_build", args=[persona.pk]), build, follow=True)  # a double click
    assert Job.objects.filter(persona=persona).count() == 1
    for response in (first, again):  # the page shown last does not say the person did something wrong
        assert "already being built" not in response.content.decode()
    jobs.build_double(Job.objects.get(persona=persona).pk)
    with pytest.raises(services.NotAllowed, match="already being built or is ready"):
        services.request_training(Persona.objects.get(pk=persona.pk))


def test_portraits_asked_for_twice_are_one_job_until_it_has_run(owner, owner_client):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 2)
    ask = {"persona": persona.pk, "templates": [t.pk for t in templates]}
    responses = [owner_client.post(reverse("portraits_request"), ask, follow=True) for _ in range(2)]
    (job,) = Job.objects.filter(persona=persona, kind=Job.Kind.GENERATE)
    for response in responses:
        assert "Your portraits are on their way." in response.content.decode()
    assert services.request_portraits(persona, templates[::-1]) == job  # the same choice in another order
    other_choice = services.request_portraits(persona, templates[:1])
    assert other_choice != job
    jobs.make_portraits(job.pk)
    assert services.request_portraits(persona, templates) != job  # asked again once done: another take


def test_a_request_made_again_while_the_first_is_stopping_is_a_new_one(owner):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 1)
    first = services.request_portraits(persona, templates)
    Job.objects.filter(pk=first.pk).update(status="running")
    services.cancel_job(Job.objects.get(pk=first.pk))
    assert services.request_portraits(persona, templates) != first  # not the job that is stopping
    other = persona_with_photos(owner, "Other")
    build = services.request_training(other)
    Job.objects.filter(pk=build.pk).update(status="running")
    services.cancel_job(Job.objects.get(pk=build.pk))
    with pytest.raises(services.NotAllowed, match="still stopping"):
        services.request_training(Persona.objects.get(pk=other.pk))


def test_a_job_cancelled_before_a_passing_failure_stops_instead_of_waiting_again(owner, monkeypatch):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)

    def cancelled_then_connection_lost(*args):
        services.cancel_job(Job.objects.get(pk=job.pk))  # the person cancels while it runs
        raise redis.exceptions.ConnectionError("connection reset by peer")

    monkeypatch.setattr(jobs, "unpack_preprocessed", cancelled_then_connection_lost)
    jobs.build_double(job.id)
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("cancelled", 0)
    assert Persona.objects.get(pk=persona.pk).status == "cancelled"


def test_cancelling_a_running_job_says_it_is_stopping(owner, owner_client):
    job = services.request_training(persona_with_photos(owner))
    Job.objects.filter(pk=job.pk).update(status="running", started=timezone.now(), heartbeat=timezone.now())
    reporter = jobs.JobReporter(Job.objects.get(pk=job.pk))  # the worker's copy, from before the cancel
    answer = owner_client.post(reverse("job_cancel", args=[job.pk]), headers={"HX-Request": "true"}).content.decode()
    assert "Stopping at its next step…" in answer and "Cancel</button>" not in answer
    with pytest.raises(Cancelled):
        reporter(Progress("training", 0.5))
    assert reporter.job.cancel_requested  # so what the worker publishes says "stopping" too
    assert "Stopping at its next step…" in owner_client.get(reverse("jobs_panel")).content.decode()


def test_a_job_whose_queue_entry_was_lost_goes_back_in_line(owner):
    persona = ready_persona(owner)
    first, second = (services.request_portraits(persona, [template]) for template in demo_templates(owner, 2))
    django_rq.get_connection("gpu").flushdb()  # Redis restarted with nothing kept
    assert services.requeue_lost_jobs() == 1  # the second one never had an entry: it waits its turn
    first.refresh_from_db()
    assert first.rq_job_id and queued_ids() == [first.rq_job_id]
    assert services.requeue_lost_jobs() == 0
    jobs.make_portraits(first.pk)
    second.refresh_from_db()
    assert Job.objects.get(pk=first.pk).status == "succeeded" and queued_ids()[-1] == second.rq_job_id
    # An entry whose run failed before the job was taken (its worker met the database down).
    django_rq.get_queue("gpu").fetch_job(second.rq_job_id).set_status(JobStatus.FAILED)
    assert services.requeue_lost_jobs() == 1
    assert Job.objects.get(pk=second.pk).rq_job_id not in ("", second.rq_job_id)


def test_portraits_of_templates_deleted_meanwhile_fail_in_words(owner, owner_client):
    persona = ready_persona(owner)
    job = services.request_portraits(persona, demo_templates(owner, 1))
    job.templates.all().delete()  # staff deleted it while the job waited (the admin no longer lets them)
    with pytest.raises(jobs.CannotRun):
        jobs.make_portraits(job.pk)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_for_person == jobs.TEMPLATES_GONE
    home = owner_client.get(reverse("home")).content.decode()
    assert "taken out of the gallery before your portraits were made" in home


def test_migration_0009_keys_portrait_jobs_asked_for_before_it(owner):
    """Two waiting portrait jobs of one double had no key: without one each, the constraint fails."""
    persona = ready_persona(owner)
    waiting = [services.request_portraits(persona, [template]) for template in demo_templates(owner, 2)]
    call_command("migrate", "studio", "0008", verbosity=0)
    call_command("migrate", "studio", verbosity=0)
    assert [Job.objects.get(pk=job.pk).templates_key for job in waiting] == [
        f"before-0009-job-{job.pk}" for job in waiting
    ]
    assert Job.objects.get(persona=persona, kind=Job.Kind.TRAIN).templates_key == ""


def test_photos_are_fixed_once_the_build_is_queued(owner, owner_client):
    persona = persona_with_photos(owner)
    services.request_training(persona)
    photo = persona.photos.first()
    owner_client.post(reverse("photo_delete", args=[photo.pk]))
    assert Photo.objects.filter(pk=photo.pk).exists()
    upload = SimpleUploadedFile("more.jpg", (FACES / "obama_small.jpg").read_bytes())
    response = owner_client.post(reverse("photo_upload", args=[persona.pk]), {"photos": [upload]}, follow=True)
    assert response.redirect_chain == [(reverse("persona", args=[persona.pk]), 302)]
    assert "cannot change while it is being built" in response.content.decode()
    assert persona.photos.count() == 5


@pytest.mark.parametrize("value", ["abc", "²", "", "-1"])
def test_portrait_request_with_odd_ids_is_a_404_not_a_500(owner_client, value):
    response = owner_client.post(reverse("portraits_request"), {"persona": value, "templates": [value]})
    assert response.status_code == 404


def test_passing_failure_puts_the_job_back_in_line_then_fails(owner, monkeypatch):
    """A lost Redis or database connection is retried MAX_RETRIES times, then reported."""
    persona = persona_with_photos(owner)
    job = services.request_training(persona)

    def connection_lost(*args):
        raise redis.exceptions.ConnectionError("connection reset by peer")

    monkeypatch.setattr(jobs, "unpack_preprocessed", connection_lost)
    for attempt in range(jobs.MAX_RETRIES):
        with pytest.raises(redis.exceptions.ConnectionError):
            jobs.build_double(job.id)
        job.refresh_from_db()
        assert (job.status, job.attempts) == ("queued", attempt + 1)
        assert job.rq_job_id and job.rq_job_id in queued_ids()  # dispatched again
    with pytest.raises(redis.exceptions.ConnectionError):
        jobs.build_double(job.id)
    job.refresh_from_db()
    assert job.status == "failed" and job.error_for_person == jobs.FAILED_UNEXPECTEDLY


def test_each_job_kind_has_its_own_timeout(owner, settings):
    persona = ready_persona(owner)
    django_rq.get_queue("gpu").empty()
    job = services.request_portraits(persona, demo_templates(owner, 1))
    rq_job = django_rq.get_queue("gpu").fetch_job(Job.objects.get(pk=job.pk).rq_job_id)
    assert rq_job.timeout == settings.PORTRAIT_JOB_TIMEOUT_S != settings.GPU_JOB_TIMEOUT_S


def test_a_portrait_whose_row_cannot_be_written_leaves_no_file(owner, monkeypatch):
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    job = services.request_portraits(persona, [template])

    def lost_database(*args, **kwargs):
        raise OperationalError("the database went away")

    monkeypatch.setattr(Portrait, "save", lost_database)
    with pytest.raises(OperationalError):
        services.save_portrait(job, template, Image.new("RGB", (64, 64), "grey"), 0.9)
    assert list((Path(settings.MEDIA_ROOT) / "users" / str(owner.id)).glob("portraits/*")) == []
