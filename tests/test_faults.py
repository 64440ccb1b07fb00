"""Jobs that survive faults (issue 26): real worker processes and the real redis-server, killed
(SIGKILL), stopped (SIGTERM once, twice), and Redis stopped and started again; and the pieces that
make it hold, one by one: portraits keyed by job and template, lost jobs put back in line once,
temporary folders and orphan files swept.

Each process test is bounded: every wait has its limit, and what it waits for is what a person or
/healthz would see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import django_rq
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from PIL import Image
from rq import Worker

import tests.redis_plugin
from photobooth.asgi import application
from photobooth.dev import redis_server_binary
from studio import jobs, services
from studio.models import Job, Portrait, upload_portrait
from studio.worker import COLD_STOP_S, MAINTENANCE_INTERVAL_S, StudioWorker
from tests.job_faults import marker
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona, twelve_templates
from tests.processes import output_of, start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# What the README promises: a dead worker's job is noticed within about 30 s (its registration
# expires WORKER_TTL_S after its last beat; the next maintenance round finds it).
DETECTION_S = services.WORKER_TTL_S + MAINTENANCE_INTERVAL_S + 5


@pytest.fixture
def worker_tmp(tmp_path) -> Path:
    """The workers' TMPDIR: their job folders are looked for here."""
    folder = tmp_path / "worker-tmp"
    folder.mkdir()
    return folder


@pytest.fixture
def workers(worker_tmp):
    started = []

    def start(**env: str) -> subprocess.Popen:
        started.append(start_worker(TMPDIR=str(worker_tmp), **env))
        return started[-1]

    yield start
    for process in started:
        print(stop(process, kill=True)[-5000:])  # shown when a test fails


def job_row(job: Job) -> Job:
    return Job.objects.get(pk=job.pk)


def live_workers() -> list[Worker]:
    return Worker.all(queue=django_rq.get_queue("gpu"))


def process_of(job: Job, started: list[subprocess.Popen]) -> subprocess.Popen:
    """The worker process that runs the job, by the worker name its row records."""
    name = wait_for(lambda: job_row(job).worker, 60, "the job to start on a worker")
    (pid,) = [worker.pid for worker in live_workers() if worker.name == name]
    (process,) = [process for process in started if process.pid == pid]
    return process


def assert_once_per_template(job: Job, count: int) -> None:
    templates = list(Portrait.objects.filter(job=job).values_list("template_id", flat=True))
    assert len(templates) == len(set(templates)) == count, templates


def assert_no_orphan_files(owner) -> None:
    """Every file in the person's media folder is named by one of their rows, and each is whole."""
    media = Path(settings.MEDIA_ROOT)
    on_disk = {path.relative_to(media).as_posix() for path in (media / "users" / str(owner.id)).rglob("*") if path.is_file()}
    assert on_disk == services._named_files(owner.id)
    for portrait in Portrait.objects.filter(owner=owner):
        with portrait.image.open() as stored:
            Image.open(stored).load()


def healthz(client: Client) -> dict:
    response = client.get(reverse("healthz"))
    assert response.status_code in (200, 503)
    return response.json()


def redis_up_for(seconds: float) -> None:
    """Lost jobs are judged only once Redis has been up WORKER_TTL_S (live workers registered)."""
    uptime = django_rq.get_connection("gpu").info("server")["uptime_in_seconds"]
    time.sleep(max(0, seconds - uptime + 1))


# --- A worker killed (SIGKILL) -----------------------------------------------------------------


def test_a_killed_worker_is_noticed_in_seconds_and_its_job_finishes_elsewhere_once(
    owner, owner_client, workers, worker_tmp
):
    """Two workers; the busy one is killed mid-request: its job is put back in line within the
    detection time and the other worker renders only what is missing."""
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    started = [workers(), workers()]
    wait_for(lambda: len(live_workers()) == 2, 120, "both workers to start")
    assert healthz(owner_client)["worker"]["gpu_workers"] == 2
    job = services.request_portraits(persona, templates)
    busy = process_of(job, started)
    first_run = job_row(job).worker
    wait_for(lambda: Portrait.objects.filter(job=job).exists(), 60, "the first portraits")
    wait_for(lambda: any(worker_tmp.glob("photobooth-worker-*/photobooth-portraits-*")), 10, "the job's folder")
    busy.send_signal(signal.SIGKILL)
    busy.wait(timeout=10)
    killed_at = time.monotonic()

    # Back in line (queued), or already running again on the other worker.
    wait_for(lambda: (row := job_row(job)).status != "running" or row.worker != first_run, DETECTION_S,
             "the lost job to be put back in line")
    noticed_s = time.monotonic() - killed_at
    print(f"the lost job was put back in line {noticed_s:.1f} s after the kill")
    assert job_row(job).lost_workers == 1
    wait_for(lambda: healthz(owner_client)["worker"]["gpu_workers"] == 1, max(1, DETECTION_S - noticed_s),
             "/healthz to count one worker")
    wait_for(lambda: job_row(job).status == "succeeded", 120, "the job to finish on the other worker")
    assert_once_per_template(job, len(templates))
    assert "Failed" not in owner_client.get(reverse("jobs_panel")).content.decode()
    # RQ agrees: the killed run's entry is failed, not "started" for the job's timeout.
    assert not django_rq.get_queue("gpu").started_job_registry.get_job_ids()
    # The killed worker's folder (the person's face crops) goes in the other worker's maintenance.
    killed_folder = worker_tmp / f"photobooth-worker-{busy.pid}"
    wait_for(lambda: not killed_folder.exists(), 2 * MAINTENANCE_INTERVAL_S + 5, "the killed worker's folder to go")
    assert not list(worker_tmp.glob("photobooth-worker-*/*"))
    # The kill may have landed between a portrait's files and its row: what the sweep is for.
    print(f"{services.sweep_orphan_files(older_than_s=0)} orphan file(s) swept")
    assert_no_orphan_files(owner)


def test_a_paused_worker_that_wakes_after_its_job_moved_on_stores_nothing(owner, owner_client, workers, worker_tmp):
    """A worker frozen (SIGSTOP: a suspended VM, a process swapped out) past its registration is
    taken for lost and its job finishes on the other worker. Woken, it stores nothing more of that
    run (save_portrait checks the run is still its own), leaves the finished row as it is, and goes
    on serving."""
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    started = [workers(), workers()]
    wait_for(lambda: len(live_workers()) == 2, 120, "both workers to start")
    job = services.request_portraits(persona, templates)
    paused = process_of(job, started)
    wait_for(lambda: Portrait.objects.filter(job=job).exists(), 60, "the first portraits")
    paused.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: job_row(job).status == "succeeded", DETECTION_S + 120, "the job to finish on the other worker")
        finished = job_row(job)
    finally:
        paused.send_signal(signal.SIGCONT)
    # Awake: it registers again within a beat, and the run it was in stops at its next store.
    wait_for(lambda: healthz(owner_client)["worker"]["gpu_workers"] == 2, 30, "the woken worker to register again")
    again = services.request_portraits(persona, templates[:1])
    wait_for(lambda: job_row(again).status == "succeeded", 120, "the next job")
    assert paused.poll() is None
    row = job_row(job)
    assert (row.status, row.finished, row.error_for_person) == ("succeeded", finished.finished, "")
    assert_once_per_template(job, len(templates))
    print(f"{services.sweep_orphan_files(older_than_s=0)} orphan file(s) swept")
    assert_no_orphan_files(owner)


def test_a_job_lost_twice_fails_in_words_and_asking_again_renders_only_what_is_missing(
    owner, owner_client, monkeypatch
):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 3)
    job = services.request_portraits(persona, templates)
    jobs.make_portraits(job.pk)
    Portrait.objects.filter(job=job, template=templates[0]).delete()  # as if the run stopped before it
    redis_up_for(services.WORKER_TTL_S)
    # Running on a worker that no longer beats, and lost once before.
    Job.objects.filter(pk=job.pk).update(status="running", worker="gone-worker", lost_workers=1)
    assert "Failed" in owner_client.get(reverse("home")).content.decode()  # the page looked: it ended
    row = job_row(job)
    assert (row.status, row.error_for_person) == ("failed", services.WORKER_LOST)
    assert "The machine working on this stopped. Please try again." in owner_client.get(reverse("home")).content.decode()
    # Trying again is the same request: the failed job goes back in line and renders one template.
    assert services.request_portraits(persona, templates).pk == job.pk
    assert job_row(job).status == "queued"
    rendered = []
    render = jobs.render_portraits
    monkeypatch.setattr(jobs, "render_portraits", lambda subject, faces, *a, **k: rendered.append(len(faces)) or
                        render(subject, faces, *a, **k))
    jobs.make_portraits(job.pk)
    assert job_row(job).status == "succeeded" and rendered == [1]
    assert_once_per_template(job, 3)


def test_a_request_is_never_folded_into_a_dead_job(owner):
    persona = ready_persona(owner)
    templates = demo_templates(owner, 1)
    job = services.request_portraits(persona, templates)
    redis_up_for(services.WORKER_TTL_S)
    Job.objects.filter(pk=job.pk).update(status="running", worker="gone-worker", rq_job_id="")
    asked = services.request_portraits(persona, templates)
    assert asked.pk == job.pk and job_row(job).status == "queued"  # back in line, so it runs
    assert job_row(job).rq_job_id in django_rq.get_queue("gpu").job_ids


def test_a_portrait_is_stored_once_per_job_and_template(owner):
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    job = services.request_portraits(persona, [template])
    image = Image.new("RGB", (64, 64), "grey")
    assert services.save_portrait(job, template, image, 0.9) is not None
    assert services.save_portrait(job, template, image, 0.9) is None  # a second run of the job
    assert Portrait.objects.filter(job=job).count() == 1
    assert_no_orphan_files(owner)


def test_a_portrait_stopped_between_its_files_and_its_row_leaves_no_file(owner, monkeypatch):
    """SystemExit (a cold shutdown) after the files are written: they go with the row not written."""
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    job = services.request_portraits(persona, [template])

    def stopped(*args, **kwargs):
        raise SystemExit()

    monkeypatch.setattr(Portrait, "save", stopped)
    with pytest.raises(SystemExit):
        services.save_portrait(job, template, Image.new("RGB", (64, 64), "grey"), 0.9)
    assert not list((Path(settings.MEDIA_ROOT) / "users" / str(owner.id)).glob("portraits/*"))


def test_migration_0010_keeps_the_first_of_repeated_portraits(owner):
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    job = services.request_portraits(persona, [template])
    call_command("migrate", "studio", "0009", verbosity=0)
    try:
        kept, copy = (stored_portrait(job, template) for _ in range(2))  # a job run twice, as before
    finally:
        call_command("migrate", "studio", verbosity=0)
    assert list(Portrait.objects.filter(job=job).values_list("pk", flat=True)) == [kept.pk]
    assert not services.default_storage.exists(copy.image.name)
    assert services.default_storage.exists(kept.image.name)


def stored_portrait(job: Job, template):
    """A portrait row and its file, written as save_portrait did before 0010 (no key, no job lock),
    through the model as it was at 0009: today's has columns that 0009 has not."""
    state = MigrationExecutor(connection).loader.project_state(("studio", "0009_job_templates_key"))
    portrait = state.apps.get_model("studio", "Portrait")
    name = services.default_storage.save(upload_portrait(job, "portrait.jpg"), ContentFile(b"a portrait"))
    return portrait.objects.create(
        owner_id=job.owner_id, persona_id=job.persona_id, template_id=template.pk, job_id=job.pk, image=name
    )


# --- Shutdown: SIGTERM once, twice ----------------------------------------------------------


def test_one_sigterm_puts_the_job_back_in_line_and_the_next_worker_finishes_it(owner, workers, worker_tmp):
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    first = workers()
    job = services.request_portraits(persona, templates)
    wait_for(lambda: Portrait.objects.filter(job=job).exists(), 120, "the first portraits")
    first.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert first.wait(timeout=30) == 0
    print(f"the worker exited {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    row = job_row(job)
    assert (row.status, row.worker, row.lost_workers) == ("queued", "", 0)
    kept = Portrait.objects.filter(job=job).count()
    assert 0 < kept < len(templates)
    assert not list(worker_tmp.glob("photobooth-worker-*/*"))  # its job folder went with the run
    workers()
    wait_for(lambda: job_row(job).status == "succeeded", 120, "the next worker to finish the job")
    assert_once_per_template(job, len(templates))
    assert_no_orphan_files(owner)


def test_a_second_sigterm_stops_the_worker_at_once_and_the_row_goes_back_in_line(
    owner, workers, worker_tmp, monkeypatch
):
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    with monkeypatch.context() as patched:  # its second batch takes long: the signals land inside it
        patched.setitem(services.JOB_FUNCTIONS, Job.Kind.GENERATE, "tests.job_faults.make_portraits_with_a_long_second_batch")
        job = services.request_portraits(persona, templates)
    worker = workers()
    # The first batch is stored: the second is being rendered.
    wait_for(marker(job.pk, "rendering", worker_tmp).exists, 180, "the second batch")
    assert Portrait.objects.filter(job=job).count() == jobs.PORTRAIT_BATCH
    worker.send_signal(signal.SIGTERM)
    time.sleep(1.2)  # RQ takes two signals within a second for one
    assert worker.poll() is None, output_of(worker)[-3000:]  # one signal waits for the batch
    worker.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    worker.wait(timeout=COLD_STOP_S + 10)  # it never hangs
    print(f"the worker exited {time.monotonic() - stopped_at:.1f} s after the second SIGTERM")
    row = job_row(job)
    assert (row.status, row.worker) == ("queued", ""), row.error_detail
    output = output_of(worker)
    assert "stopping at once" in output, output[-3000:]  # ours, not RQ's SystemExit wherever the job was
    assert not list(worker_tmp.glob("photobooth-worker-*/*"))
    rq_entry = django_rq.get_queue("gpu").fetch_job(row.rq_job_id)
    assert rq_entry is not None and rq_entry.get_status() == "queued"  # a new entry; the old one failed
    assert not django_rq.get_queue("gpu").started_job_registry.get_job_ids()
    # The process may have ended between a portrait's files and its row: what the sweep is for.
    print(f"{services.sweep_orphan_files(older_than_s=0)} orphan file(s) swept")
    assert_no_orphan_files(owner)


def test_systemexit_inside_a_job_puts_it_back_in_line(owner):
    """A plain RQ worker's cold shutdown raises SystemExit wherever the job is."""
    job = services.request_training(persona_with_photos(owner))

    def work(job, report):
        raise SystemExit()

    with pytest.raises(SystemExit):
        jobs.run_job(job.pk, work)
    row = job_row(job)
    assert (row.status, row.worker) == ("queued", "")
    assert row.rq_job_id in django_rq.get_queue("gpu").job_ids


# --- Redis stopped and started ---------------------------------------------------------------


def stop_redis() -> None:
    server = tests.redis_plugin._server
    server.process.terminate()
    server.process.wait(timeout=10)


def start_redis() -> None:
    """The same port, nothing kept: as `make run`'s Redis comes back."""
    server = tests.redis_plugin._server
    server.process = subprocess.Popen(
        [redis_server_binary(), "--port", str(server.port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", server._folder.name],
        stdout=subprocess.DEVNULL,
    )
    server._wait_until_ready()


def open_socket(client: Client) -> tuple[bool, str]:
    """A page's socket: whether it was accepted, and what it received first (or how it closed)."""

    async def scenario():
        cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
        communicator = WebsocketCommunicator(
            application, "/ws/jobs/", headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)]
        )
        connected, _code = await communicator.connect(timeout=20)
        first = await communicator.receive_output(timeout=20) if connected else {}
        await communicator.disconnect()
        return connected, first.get("text", "") or str(first.get("code", ""))

    return async_to_sync(scenario)()


PAGES = ["home", "album", "gallery", "jobs_panel", "account"]


def test_redis_stopped_and_started_is_weather(owner, owner_client, workers):
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    worker = workers()
    wait_for(lambda: len(live_workers()) == 1, 120, "the worker to start")
    running = services.request_portraits(persona, templates)
    waiting = services.request_portraits(persona, templates[:1])  # held in the database: one job at a time
    wait_for(lambda: Portrait.objects.filter(job=running).exists(), 120, "the first portraits")
    stop_redis()
    try:
        outage_ends = time.monotonic() + 10
        answers = []
        cancel = owner_client.post(reverse("job_cancel", args=[waiting.pk]), headers={"HX-Request": "true"})
        answers.append(cancel.status_code)
        assert "Live updates resume shortly." in cancel.content.decode()
        assert job_row(waiting).status == "cancelled"
        assert healthz(owner_client)["ok"] is False
        assert open_socket(owner_client)[0] in (True, False)  # answered, not an error
        while time.monotonic() < outage_ends:
            answers += [owner_client.get(reverse(page)).status_code for page in PAGES]
            time.sleep(0.5)
        assert worker.poll() is None, "the worker exited while Redis was down"
    finally:
        start_redis()
    restarted_at = time.monotonic()
    assert all(code < 500 for code in answers), answers
    wait_for(lambda: healthz(owner_client)["ok"], 30, "/healthz to say the worker is back")
    print(f"/healthz was true {time.monotonic() - restarted_at:.1f} s after Redis came back")
    connected, first = open_socket(owner_client)
    assert connected and 'id="jobs"' in first  # the first socket after the restart works
    wait_for(lambda: job_row(running).status == "succeeded", 120, "the running job to finish")
    assert_once_per_template(running, len(templates))  # it went on, not from the start again
    after = services.request_portraits(persona, demo_templates(owner, 1))
    wait_for(lambda: job_row(after).status == "succeeded", 60, "a job asked for after the outage")
    assert worker.poll() is None


# --- Temporary folders and orphan files ------------------------------------------------------


def test_job_folders_are_swept_and_delete_my_data_reaches_them(owner, owner_client, other_user, monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    persona = ready_persona(owner)
    job = Job.objects.filter(persona=persona).first()
    # Left as a killed run leaves them (held here, so that nothing removes them on the way).
    held = [services.job_folder(job, "portraits"),
            services.job_folder(Job.objects.create(persona=persona_with_photos(other_user), kind="train"), "double")]
    theirs, other = (Path(folder.name) for folder in held)
    (theirs / "embeddings.npy").write_bytes(b"face data")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = services.worker_folder(int(ended.stdout))
    (dead / "photobooth-portraits-u987654-j1-x").mkdir(parents=True)
    response = owner_client.post(reverse("delete_data"), {"confirm": "on"})
    assert response.status_code == 302
    assert not theirs.exists() and other.exists()  # at once, on the machine of the request
    assert services.sweep_job_folders() >= 2  # between jobs: all of this process's, a dead one's
    assert not other.exists() and not dead.exists()


def test_files_no_row_names_are_swept_once_old(owner, settings):
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    job = services.request_portraits(persona, [template])
    jobs.make_portraits(job.pk)
    folder = Path(settings.MEDIA_ROOT) / "users" / str(owner.id) / "portraits"
    old, young = folder / "killed-before-commit.jpg", folder / "being-written.jpg"
    for orphan in (old, young):
        orphan.write_bytes(b"a portrait")
    an_hour_ago = (timezone.now() - timedelta(hours=1)).timestamp()
    os.utime(old, (an_hour_ago, an_hour_ago))
    worker = StudioWorker([django_rq.get_queue("gpu")], connection=django_rq.get_connection("gpu"))
    worker.run_maintenance_tasks()
    assert not old.exists() and young.exists()
    young.unlink()
    assert_no_orphan_files(owner)
