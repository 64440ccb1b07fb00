"""Deleting a double, or all of a person's data, while a real worker runs their job (issue 27).

Real worker processes (studio.worker's non-forking StudioWorker, started as `make run` starts it)
and the real redis-server run the real portrait job (studio.jobs.make_portraits: run_job, the job
folder, save_portrait). Only its timing is the test's: `make_portraits_pausing` renders as always,
but after rendering its second batch, before storing it, it waits for the test to act (at most
PAUSE_S), so that what the test does lands where a real delete can land and a test cannot aim
with a clock: between a rendered batch and its portraits' rows. It writes what it saw in marker
files in the worker's temporary folder (TMPDIR). The person acts through the site (Django's test
Client); the web process and the worker share one TMPDIR, as on one machine.

Every wait has its limit, and what it waits for is what a person, RQ's registries or the disk
would show.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import django_rq
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from studio import jobs, services
from studio.models import FaceConsent, Job, Persona, Photo, Portrait, Template
from tests.jobs_fixtures import demo_templates, ready_persona
from tests.processes import output_of, start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

PAUSED_BATCH = 1  # the second batch (from 0): the first one's portraits are stored when the test acts
PAUSE_S = 60  # the most the worker waits for the test; then it goes on by itself
TEMPLATES = 2 * jobs.PORTRAIT_BATCH  # two batches
# A fresh worker loads Django and its face models, unpacks the double and renders two batches on a
# busy two-core machine before it pauses.
PAUSED_WITHIN_S = 120
REFUSED = "Something is being made from this double right now. Cancel it, or let it finish, then delete the double."


# --- The job the worker runs: the real one, with a pause -----------------------------------


def marker(job_id: int, what: str, folder: Path | str | None = None) -> Path:
    """A file the pausing job `job_id` writes (or, "go", reads) in the worker's TMPDIR."""
    return Path(folder or tempfile.gettempdir()) / f"photobooth-test-delete-{what}-{job_id}.json"


def _write(job_id: int, what: str, **facts) -> None:
    path = marker(job_id, what)
    path.with_suffix(".part").write_text(json.dumps(facts))
    path.with_suffix(".part").rename(path)  # whole, or not there: the test polls for it


def make_portraits_pausing(job_id: int) -> None:
    """studio.jobs.make_portraits, which after rendering batch PAUSED_BATCH writes marker "rendered"
    (with the job's folders as they are) and waits for marker "go" before storing that batch; it
    writes marker "stored" with what save_portrait did with the first portrait after the pause."""
    render, save = jobs.render_portraits, services.save_portrait
    rendered = []

    def render_then_wait(*args, **kwargs):
        results = render(*args, **kwargs)
        rendered.append(len(results))
        if len(rendered) == PAUSED_BATCH + 1:
            folders = [str(path) for path in services.worker_folder().glob(f"photobooth-*-j{job_id}-*")]
            _write(job_id, "rendered", folders=folders)
            deadline = time.monotonic() + PAUSE_S
            while not marker(job_id, "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return results

    def save_and_tell(job, *args, **kwargs):
        if len(rendered) <= PAUSED_BATCH or marker(job_id, "stored").exists():
            return save(job, *args, **kwargs)
        try:
            portrait = save(job, *args, **kwargs)
        except BaseException as error:
            _write(job_id, "stored", stored=False, raised=type(error).__name__)
            raise
        _write(job_id, "stored", stored=portrait is not None, raised=None)
        return portrait

    jobs.render_portraits, services.save_portrait = render_then_wait, save_and_tell
    try:
        jobs.make_portraits(job_id)
    finally:
        jobs.render_portraits, services.save_portrait = render, save


PAUSING = f"{__name__}.make_portraits_pausing"


# --- Helpers --------------------------------------------------------------------------------


@pytest.fixture
def worker_tmp(tmp_path, monkeypatch) -> Path:
    """The TMPDIR of the workers and of this process (the site): one machine's. Its job folders
    are looked for here, and "delete my data" removes the person's from here at once."""
    folder = tmp_path / "worker-tmp"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder


@pytest.fixture
def workers(worker_tmp):
    started = []

    def start() -> subprocess.Popen:
        started.append(start_worker(TMPDIR=str(worker_tmp)))
        return started[-1]

    yield start
    for process in started:
        print(stop(process, kill=True)[-5000:])  # shown when a test fails


def ask_pausing(monkeypatch, persona: Persona, templates: list[Template]) -> Job:
    """Portraits asked for as a person asks; their queue entry names the pausing job. Asked before
    the workers start, so only this process dispatches it."""
    with monkeypatch.context() as patched:
        patched.setitem(services.JOB_FUNCTIONS, Job.Kind.GENERATE, PAUSING)
        job = services.request_portraits(persona, templates)
    job.refresh_from_db()
    assert django_rq.get_queue("gpu").fetch_job(job.rq_job_id).func_name == PAUSING
    return job


def paused(job: Job, worker_tmp: Path) -> dict:
    """Waits until the worker has rendered the job's second batch and waits; returns its marker."""
    found = marker(job.pk, "rendered", worker_tmp)
    wait_for(found.exists, PAUSED_WITHIN_S, f"job {job.pk} to render its second batch")
    return json.loads(found.read_text())


def go_on(job_id: int, worker_tmp: Path) -> None:
    marker(job_id, "go", worker_tmp).write_text("{}")


def stored_after_pause(job_id: int, worker_tmp: Path) -> dict:
    found = marker(job_id, "stored", worker_tmp)
    wait_for(found.exists, 30, f"job {job_id} to store (or not) its first portrait after the pause")
    return json.loads(found.read_text())


def files_of(owner_id: int) -> set[str]:
    """Every file under the person's media folder, as storage names."""
    media = Path(settings.MEDIA_ROOT)
    return {path.relative_to(media).as_posix() for path in (media / "users" / str(owner_id)).rglob("*") if path.is_file()}


def job_folders_of(owner_id: int, worker_tmp: Path) -> list[Path]:
    return list(worker_tmp.glob(f"photobooth-worker-*/photobooth-*-u{owner_id}-j*"))


def rows_of(owner_id: int) -> dict[str, int]:
    models = (Persona, Photo, Job, Portrait, FaceConsent)
    return {model.__name__: model.objects.filter(owner_id=owner_id).count() for model in models}


def rq_status(rq_job_id: str) -> str | None:
    entry = django_rq.get_queue("gpu").fetch_job(rq_job_id)
    return entry.get_status() if entry is not None else None


def started_on_rq() -> list[str]:
    return django_rq.get_queue("gpu").started_job_registry.get_job_ids()


def job_status(job: Job) -> str | None:
    return Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()


def answers(response) -> None:
    """Every hop of a followed request answered, none with a server error."""
    codes = [code for _url, code in response.redirect_chain] + [response.status_code]
    assert all(code < 500 for code in codes), codes


def templates_for(owner: User) -> list[Template]:
    return [template for _ in range(TEMPLATES // 4) for template in demo_templates(owner, 4)]


# --- "Delete my data" while the person's job runs -------------------------------------------


def test_delete_my_data_while_the_worker_renders_leaves_nothing_and_the_worker_goes_on(
    owner, owner_client, other_user, monkeypatch, workers, worker_tmp
):
    persona = ready_persona(owner)
    templates = templates_for(owner)
    job = ask_pausing(monkeypatch, persona, templates)
    rq_job_id = job.rq_job_id
    # Another person's job waits behind it: one worker, which must take it once the first run ends.
    theirs = services.request_portraits(ready_persona(other_user, "Theirs"), templates[:1])
    worker = workers()

    held = paused(job, worker_tmp)["folders"]
    assert held and all(Path(folder).is_dir() for folder in held)  # the person's face data, in use
    assert job_status(job) == "running" and Portrait.objects.filter(job=job).count() == jobs.PORTRAIT_BATCH
    assert files_of(owner.pk)  # photos' crops, the double, the first batch's portraits
    ran_on = Job.objects.get(pk=job.pk).worker

    response = owner_client.post(reverse("delete_data"), {"confirm": "on"}, follow=True)

    answers(response)
    assert response.redirect_chain[-1][0] == reverse("account")
    assert "All your photos, doubles and portraits are deleted." in response.content.decode()
    assert rows_of(owner.pk) == dict.fromkeys(rows_of(owner.pk), 0)
    assert not files_of(owner.pk)
    # The job's folder went at once, on this machine, while the run still held it.
    assert not job_folders_of(owner.pk, worker_tmp) and not any(Path(folder).exists() for folder in held)
    assert rq_job_id in started_on_rq()  # the worker is still in the job

    go_on(job.pk, worker_tmp)
    # The batch it rendered before the delete is not stored: its job row is gone.
    assert stored_after_pause(job.pk, worker_tmp) == {"stored": False, "raised": "Cancelled"}
    # The run ends quietly: done for RQ (a person's delete is not a failure for staff to look into).
    assert wait_for(lambda: rq_status(rq_job_id) in services.RQ_ENDED and rq_status(rq_job_id), 30,
                    "RQ to record the end of the deleted job's run") == "finished"
    assert rq_job_id not in started_on_rq()
    # The same worker goes on to the next person's job.
    wait_for(lambda: job_status(theirs) not in Job.ACTIVE, 60, "the other person's job to end")
    done = Job.objects.get(pk=theirs.pk)
    assert (done.status, done.worker) == ("succeeded", ran_on), done.error_detail
    assert Portrait.objects.filter(job=theirs).count() == 1
    assert worker.poll() is None, output_of(worker)[-3000:]
    # Nothing of the person came back once the worker moved on.
    assert rows_of(owner.pk) == dict.fromkeys(rows_of(owner.pk), 0)
    assert not files_of(owner.pk), files_of(owner.pk)
    assert not job_folders_of(owner.pk, worker_tmp)
    assert not started_on_rq()
    assert f"job {job.pk} failed" not in output_of(worker)


# --- Deleting the double while its job runs ----------------------------------------------------


def test_a_double_whose_job_runs_is_not_deleted_and_is_once_the_job_is_cancelled(
    owner, owner_client, monkeypatch, workers, worker_tmp
):
    persona = ready_persona(owner)
    job = ask_pausing(monkeypatch, persona, templates_for(owner))
    worker = workers()
    held = paused(job, worker_tmp)["folders"]
    files, rows = files_of(owner.pk), rows_of(owner.pk)
    assert rows["Portrait"] == jobs.PORTRAIT_BATCH

    refused = owner_client.post(reverse("persona_delete", args=[persona.pk]), {"confirm": "on"}, follow=True)

    answers(refused)
    assert refused.redirect_chain[-1][0] == reverse("persona", args=[persona.pk])
    assert REFUSED in refused.content.decode()
    assert (files_of(owner.pk), rows_of(owner.pk)) == (files, rows)  # nothing deleted
    assert job_status(job) == "running" and all(Path(folder).is_dir() for folder in held)

    cancel = owner_client.post(reverse("job_cancel", args=[job.pk]), headers={"HX-Request": "true"})
    assert cancel.status_code == 200
    go_on(job.pk, worker_tmp)
    assert stored_after_pause(job.pk, worker_tmp) == {"stored": False, "raised": "Cancelled"}
    wait_for(lambda: job_status(job) == "cancelled", 30, "the cancelled job to stop")
    assert not job_folders_of(owner.pk, worker_tmp)  # the run removed its folder as it ended

    deleted = owner_client.post(reverse("persona_delete", args=[persona.pk]), {"confirm": "on"}, follow=True)

    answers(deleted)
    assert deleted.redirect_chain[-1][0] == reverse("home")
    assert "“Me”, its photos and its portraits are deleted." in deleted.content.decode()
    assert not Persona.objects.filter(pk=persona.pk).exists()
    assert {name: count for name, count in rows_of(owner.pk).items() if name != "FaceConsent"} == {
        "Persona": 0, "Photo": 0, "Job": 0, "Portrait": 0
    }
    assert not files_of(owner.pk), files_of(owner.pk)
    assert not started_on_rq() and worker.poll() is None


# --- Another person's data and running job ---------------------------------------------------


def test_delete_my_data_leaves_another_persons_running_job_and_data_alone(
    owner, owner_client, other_user, monkeypatch, workers, worker_tmp
):
    """Two workers, each in one person's job; the first person deletes their data and account."""
    mine = ready_persona(owner)
    theirs = ready_persona(other_user, "Theirs")
    templates = templates_for(other_user)
    my_job = ask_pausing(monkeypatch, mine, templates)
    their_job = ask_pausing(monkeypatch, theirs, templates)
    for _ in range(2):
        workers()
    paused(my_job, worker_tmp)
    their_folders = paused(their_job, worker_tmp)["folders"]
    their_files, their_rows = files_of(other_user.pk), rows_of(other_user.pk)
    assert their_files and their_rows["Portrait"] == jobs.PORTRAIT_BATCH

    response = owner_client.post(reverse("delete_data"), {"confirm": "on", "delete_account": "on"}, follow=True)

    answers(response)
    assert "Your account and all your data are deleted." in response.content.decode()
    assert not User.objects.filter(pk=owner.pk).exists()
    assert not job_folders_of(owner.pk, worker_tmp) and not files_of(owner.pk)
    # Theirs: the running job's folder, rows and files, as they were.
    assert their_folders and all(Path(folder).is_dir() for folder in their_folders)
    assert job_folders_of(other_user.pk, worker_tmp) == [Path(folder) for folder in their_folders]
    assert (files_of(other_user.pk), rows_of(other_user.pk)) == (their_files, their_rows)
    assert job_status(their_job) == "running"

    for job in (my_job, their_job):
        go_on(job.pk, worker_tmp)
    assert stored_after_pause(their_job.pk, worker_tmp) == {"stored": True, "raised": None}
    wait_for(lambda: job_status(their_job) not in Job.ACTIVE, 60, "the other person's job to end")
    done = Job.objects.get(pk=their_job.pk)
    assert done.status == "succeeded", done.error_detail
    assert Portrait.objects.filter(job=their_job).count() == len(templates)
    assert their_files < files_of(other_user.pk) == services._named_files(other_user.pk)
    assert stored_after_pause(my_job.pk, worker_tmp) == {"stored": False, "raised": "Cancelled"}
    wait_for(lambda: not started_on_rq(), 30, "RQ to record the end of both runs")
    assert not files_of(owner.pk) and not job_folders_of(owner.pk, worker_tmp)
    assert rows_of(owner.pk) == dict.fromkeys(rows_of(owner.pk), 0)
