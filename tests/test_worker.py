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
from django.test import Client
from django.urls import reverse
from rq.exceptions import StopRequested

from photobooth.asgi import application
from studio import services
from studio.models import Job, Portrait
from studio.worker import StudioWorker
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona
from tests.processes import start_worker

pytestmark = pytest.mark.django_db(transaction=True)




@pytest.fixture
def workers():
    started = []
    yield lambda *args, **env: started.append(start_worker(*args, **env)) or started[-1]
    for process in started:
        if process.poll() is None:
            process.terminate()
        output, _ = process.communicate(timeout=30)
        print(output.decode(errors="replace")[-6000:])  # shown when a test fails


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def twelve_templates(owner):
    """Enough distinct templates that a job is still running when the test acts on it."""
    return [template for _ in range(3) for template in demo_templates(owner, 4)]


def socket(client: Client) -> WebsocketCommunicator:
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return WebsocketCommunicator(application, "/ws/jobs/", headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])


def test_progress_arrives_in_order_and_only_to_its_owner(owner, owner_client, other_client, workers):
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
        assert await theirs.receive_nothing(timeout=0.5)
        await mine.disconnect()
        await theirs.disconnect()

    async_to_sync(scenario)()


def test_cancel_while_running_stops_and_leaves_whole_files(owner, owner_client, workers):
    persona = ready_persona(owner)
    job = services.request_portraits(persona, twelve_templates(owner))
    workers()
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "running", 60, "the job to start")
    response = owner_client.post(reverse("job_cancel", args=[job.pk]), headers={"HX-Request": "true"})
    assert response.status_code == 200
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "cancelled", 60, "the job to stop")
    for portrait in Portrait.objects.filter(job=job):
        assert portrait.image.size > 0 and portrait.thumbnail.size > 0


def test_killed_worker_is_noticed_and_the_next_job_runs(owner, other_user, workers):
    persona = ready_persona(owner)
    job = services.request_portraits(persona, twelve_templates(owner))
    first = workers(JOB_HEARTBEAT_TIMEOUT_S="5")
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "running", 60, "the job to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    noticed_at = time.monotonic()
    workers(JOB_HEARTBEAT_TIMEOUT_S="5")
    wait_for(lambda: Job.objects.get(pk=job.pk).status == "failed", 180, "the lost job to be failed")
    assert time.monotonic() - noticed_at < 180
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
