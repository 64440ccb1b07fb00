"""Real worker processes: live progress to the owner only, cancel while running, a killed worker,
maintenance; and one maintenance round of a worker in this process, against the test Redis."""

from __future__ import annotations

import logging
import re
import signal
import time

import django_rq
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.files.storage import default_storage
from django.test import Client
from django.urls import reverse
from PIL import Image
from rq import Worker
from rq.exceptions import StopRequested

from photobooth.asgi import application
from studio import services
from studio.models import Job, Persona, Portrait
from studio.worker import StudioWorker
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona, twelve_templates
from tests.processes import start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)




@pytest.fixture
def workers():
    started = []
    yield lambda *args, **env: started.append(start_worker(*args, **env)) or started[-1]
    for process in started:
        print(stop(process)[-6000:])  # shown when a test fails


def socket(client: Client) -> WebsocketCommunicator:
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return WebsocketCommunicator(application, "/ws/jobs/", headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])


def test_progress_arrives_in_order_and_only_to_its_owner(owner, other_user, owner_client, other_client, workers):
    persona = persona_with_photos(owner)

    async def scenario():
        mine, theirs = socket(owner_client), socket(other_client)
        assert (await mine.connect())[0] and (await theirs.connect())[0]
        await mine.receive_from()
        await theirs.receive_from()
        job = await sync_to_async(services.request_training)(persona)
        await sync_to_async(workers)("--burst")
        progress, statuses = [], []
        while not {"Done", "Failed"} & set(statuses):
            fragment = await mine.receive_from(timeout=60)
            if f'id="job-{job.id}"' in fragment:
                statuses.append(re.search(r'class="job-status">([^<]+)<', fragment).group(1))
                value = re.search(r'<progress max="100" value="(\d+)"', fragment)
                if value:
                    progress.append(int(value.group(1)))
        assert statuses[0] == "Running" and statuses[-1] == "Done"
        assert progress == sorted(progress) and progress[-1] == 100
        # Something of their own, sent after the job ended: anything of the job's would arrive first.
        their_persona = await sync_to_async(Persona.objects.create)(owner=other_user, name="Theirs")
        await sync_to_async(services.publish_persona)(their_persona)
        assert f'id="persona-{their_persona.id}-status"' in await theirs.receive_from(timeout=10)
        await mine.disconnect()
        await theirs.disconnect()

    async_to_sync(scenario)()


def test_cancel_while_running_stops_and_leaves_whole_files(owner, owner_client, workers):
    persona = ready_persona(owner)
    job = services.request_portraits(persona, twelve_templates(owner))
    workers()
    wait_for(lambda: Portrait.objects.filter(job=job).exists(), 60, "the first portraits to be stored")
    response = owner_client.post(reverse("job_cancel", args=[job.pk]), headers={"HX-Request": "true"})
    assert response.status_code == 200
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "cancelled", 60, "the job to stop")
    portraits = Portrait.objects.filter(job=job)
    assert 0 < portraits.count() < 12  # stopped part-way, with portraits stored before the cancel
    kept = {portrait.image.name for portrait in portraits} | {portrait.thumbnail.name for portrait in portraits}
    folder = f"users/{owner.id}/portraits"
    assert {f"{folder}/{name}" for name in default_storage.listdir(folder)[1]} == kept  # no file without its row
    for name in kept:
        with default_storage.open(name) as stored:
            Image.open(stored).load()  # a whole JPEG: a cut-off one raises


def test_killed_worker_is_noticed_and_the_next_job_runs(owner, other_user, workers):
    """README: a job whose worker dies is failed within JOB_HEARTBEAT_TIMEOUT_S plus 20 s (the
    maintenance round of a worker still running)."""
    heartbeat_timeout_s = 5
    persona = ready_persona(owner)
    templates = twelve_templates(owner)
    # Two workers, running before the job: the idle one's maintenance rounds, 20 s apart, notice the
    # other's death (a worker started after the kill would notice at once, in its first round).
    started = [workers(JOB_HEARTBEAT_TIMEOUT_S=str(heartbeat_timeout_s)) for _ in range(2)]
    connection = django_rq.get_connection("gpu")
    wait_for(lambda: len(Worker.all(connection=connection)) == 2, 120, "both workers to start")
    job = services.request_portraits(persona, templates)
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "running", 60, "the job to start")
    rq_job_id = Job.objects.get(pk=job.pk).rq_job_id
    (busy_pid,) = [w.pid for w in Worker.all(connection=connection) if w.get_current_job_id() == rq_job_id]
    (busy,) = [process for process in started if process.pid == busy_pid]
    busy.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # The README's words, not studio.worker's constant: a slower maintenance round must fail here.
    # The 5 s beyond are what one round itself takes on a busy machine, and this test's polling.
    promised_s = heartbeat_timeout_s + 20
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "failed", promised_s + 5, "the lost job to be failed")
    print(f"the lost job was failed {time.monotonic() - killed_at:.1f} s after the kill (promised {promised_s} s)")
    assert Job.objects.get(pk=job.pk).error_for_person == services.WORKER_LOST
    next_job = services.request_training(persona_with_photos(other_user))
    wait_for(lambda: Job.objects.get(pk=next_job.pk).status == "succeeded", 120, "the next job to succeed")


def test_worker_removes_training_folders_no_build_will_resume(workers, settings):
    deleted_double = settings.TRAINING_DIR / "persona-987654-0123456789abcdef"
    (deleted_double / "checkpoints").mkdir(parents=True)
    workers()
    wait_for(lambda: not deleted_double.exists(), 60, "the worker's maintenance to remove the folder")


def in_process_worker() -> StudioWorker:
    queues = [django_rq.get_queue("gpu"), django_rq.get_queue("default")]
    return StudioWorker(queues, connection=django_rq.get_connection("gpu"))


def test_each_maintenance_round_forgets_deleted_loras_and_sweeps(settings, monkeypatch):
    deleted_double = settings.TRAINING_DIR / "persona-987654-0123456789abcdef"
    (deleted_double / "checkpoints").mkdir(parents=True)
    calls = []
    forget = services.forget_deleted_lora
    monkeypatch.setattr(services, "forget_deleted_lora", lambda: calls.append("forget") or forget())
    in_process_worker().run_maintenance_tasks()
    assert calls == ["forget"] and not deleted_double.exists()


def test_a_failing_maintenance_task_does_not_stop_the_others(settings, monkeypatch, caplog):
    """RQ quits a worker whose maintenance raises: each task is guarded on its own, and logged."""
    deleted_double = settings.TRAINING_DIR / "persona-987654-0123456789abcdef"
    (deleted_double / "checkpoints").mkdir(parents=True)

    def forget_deleted_lora():
        raise OSError("media storage unreachable")

    monkeypatch.setattr(services, "forget_deleted_lora", forget_deleted_lora)
    with caplog.at_level(logging.ERROR, logger="studio.worker"):
        in_process_worker().run_maintenance_tasks()
    assert not deleted_double.exists()
    (record,) = [r for r in caplog.records if r.name == "studio.worker"]
    assert record.getMessage() == "maintenance task forget_deleted_lora failed; the next round tries again"
    assert "media storage unreachable" in caplog.text


def test_each_maintenance_round_starts_jobs_asked_for_while_redis_was_down(owner):
    persona = ready_persona(owner)
    (template,) = demo_templates(owner, 1)
    # What request_portraits leaves when its dispatch finds no Redis: the row, waiting, no entry.
    job = Job.objects.create(persona=persona, kind=Job.Kind.GENERATE, templates_key=Job.templates_key_of([template]))
    job.templates.set([template])
    in_process_worker().run_maintenance_tasks()
    job.refresh_from_db()
    assert job.rq_job_id and job.rq_job_id in django_rq.get_queue("gpu").job_ids


def test_a_stop_asked_for_during_maintenance_stops_the_worker(monkeypatch):
    """RQ's SIGTERM handler raises StopRequested wherever the worker is; caught as a failing task,
    it left the worker running after `make run` or a test had stopped it."""

    def sigterm_arrives():
        raise StopRequested()

    monkeypatch.setattr(services, "requeue_lost_jobs", sigterm_arrives)
    with pytest.raises(StopRequested):
        in_process_worker().run_maintenance_tasks()
