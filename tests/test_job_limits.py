"""A job that meets a limit fails in words of its own and the worker goes on (issue 27): the GPU
runs out of memory, or the job runs past its RQ timeout. Real worker processes (studio.worker's
non-forking StudioWorker) and the real redis-server, running the real portrait job
(studio.jobs.make_portraits), with the fault put in its rendering by tests.job_faults.

The job is asked for as a person asks (services.request_portraits, which dispatches it with its
timeout); only the job function the queue entry names is the test's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import django_rq
import pytest

from studio import jobs, services
from studio.models import Job, Portrait
from tests.job_faults import marker
from tests.jobs_fixtures import demo_templates, ready_persona
from tests.processes import output_of, start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# The slow job's RQ timeout: long enough for a fresh worker to load its face models and reach the
# rendering on a busy two-core machine, short enough for a quick test.
TIMEOUT_S = 10


@pytest.fixture
def worker_tmp(tmp_path) -> Path:
    """The worker's TMPDIR: its job folders and the faults' markers are looked for here."""
    folder = tmp_path / "worker-tmp"
    folder.mkdir()
    return folder


@pytest.fixture
def worker(worker_tmp):
    process = start_worker(TMPDIR=str(worker_tmp))
    yield process
    print(stop(process, kill=True)[-6000:])  # shown when a test fails


def job_row(job: Job) -> Job:
    return Job.objects.get(pk=job.pk)


def ended(job: Job) -> Job | None:
    row = job_row(job)
    return row if row.status not in Job.ACTIVE else None


def ask_with_fault(monkeypatch, persona, templates, function: str) -> Job:
    """Portraits asked for as a person asks; their queue entry names `function` instead of
    studio.jobs.make_portraits. Asked before the worker starts, so only this process dispatches it."""
    with monkeypatch.context() as patched:
        patched.setitem(services.JOB_FUNCTIONS, Job.Kind.GENERATE, function)
        job = services.request_portraits(persona, templates)
    entry = django_rq.get_queue("gpu").fetch_job(job_row(job).rq_job_id)
    assert entry is not None and entry.func_name == function
    return job


def recorded(job: Job, what: str, worker_tmp: Path) -> dict:
    found = marker(job.pk, what, worker_tmp)
    assert found.exists(), f"the worker wrote no marker {what!r}"
    return json.loads(found.read_text())


def assert_job_folder_went_with_the_run(job: Job, worker_tmp: Path) -> None:
    """The job's folder (the person's face crops) existed while it rendered, and was gone when the
    run recorded its end: removed by the run itself, not by a later maintenance sweep."""
    rendering = recorded(job, "rendering", worker_tmp)["folders"]
    assert rendering, "the job had no job folder while rendering"
    assert recorded(job, "ended", worker_tmp)["folders"] == []
    assert not any(Path(folder).exists() for folder in rendering)


def assert_worker_goes_on(worker: subprocess.Popen, failed: Job, persona, templates) -> None:
    """The same worker process, still running, makes the next portraits as always."""
    assert worker.poll() is None, output_of(worker)[-3000:]
    next_job = services.request_portraits(persona, templates)
    done = wait_for(lambda: ended(next_job), 60, "the next job to end")
    assert done.status == "succeeded", done.error_detail
    assert done.worker == failed.worker  # the one that ran the failed job
    assert Portrait.objects.filter(job=next_job).count() == len(templates)
    assert worker.poll() is None


def test_a_gpu_out_of_memory_fails_the_job_in_its_own_words_and_the_worker_goes_on(
    owner, monkeypatch, worker_tmp, request
):
    persona = ready_persona(owner)
    first, second = demo_templates(owner, 2)
    job = ask_with_fault(monkeypatch, persona, [first], "tests.job_faults.make_portraits_out_of_memory")
    worker = request.getfixturevalue("worker")

    row = wait_for(lambda: ended(job), 60, "the job to end")
    assert (row.status, row.error_for_person) == ("failed", jobs.FAILED_OUT_OF_MEMORY), row.error_detail
    # Staff read what happened; the person reads the message above, not the traceback.
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in row.error_detail
    assert row.worker and row.finished
    assert marker(job.pk, "cache-emptied", worker_tmp).exists(), "the CUDA cache was not emptied"
    assert_job_folder_went_with_the_run(job, worker_tmp)
    assert_worker_goes_on(worker, row, persona, [second])


def test_a_job_past_its_timeout_is_stopped_and_fails_in_its_own_words_and_the_worker_goes_on(
    owner, monkeypatch, settings, worker_tmp, request
):
    persona = ready_persona(owner)
    first, second = demo_templates(owner, 2)
    normal_timeout_s = settings.PORTRAIT_JOB_TIMEOUT_S
    settings.PORTRAIT_JOB_TIMEOUT_S = TIMEOUT_S  # services.job_timeout_s gives it to the queue entry
    job = ask_with_fault(monkeypatch, persona, [first], "tests.job_faults.make_portraits_slowly")
    settings.PORTRAIT_JOB_TIMEOUT_S = normal_timeout_s
    rq_job_id = job_row(job).rq_job_id
    assert django_rq.get_queue("gpu").fetch_job(rq_job_id).timeout == TIMEOUT_S
    worker = request.getfixturevalue("worker")

    # The rendering would sleep 600 s: the worker's timeout stops it.
    row = wait_for(lambda: ended(job), 60 + TIMEOUT_S, "the job to end")
    assert (row.status, row.error_for_person) == ("failed", jobs.FAILED_TIMED_OUT), row.error_detail
    assert "JobTimeoutException" in row.error_detail
    ran_s = (row.finished - row.started).total_seconds()
    rendering_at = recorded(job, "rendering", worker_tmp)["at"]
    print(f"rendering began {rendering_at - row.started.timestamp():.1f} s into the run; stopped at {ran_s:.1f} s")
    assert TIMEOUT_S - 3 <= ran_s <= TIMEOUT_S + 5, ran_s  # stopped at its timeout, not before or long after
    assert not Job.objects.filter(status=Job.Status.RUNNING).exists()
    assert_job_folder_went_with_the_run(job, worker_tmp)
    assert not list(worker_tmp.glob("photobooth-worker-*/photobooth-*"))
    # RQ agrees (it records the failure just after the row): its entry failed, none is left "started".
    queue = django_rq.get_queue("gpu")
    wait_for(lambda: queue.fetch_job(rq_job_id).get_status() == "failed", 10, "RQ to record the failure")
    assert not queue.started_job_registry.get_job_ids()
    assert_worker_goes_on(worker, row, persona, [second])
