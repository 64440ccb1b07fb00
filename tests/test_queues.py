"""RQ queues and /healthz against the real test redis-server and real worker processes."""

from __future__ import annotations

import time

import django_rq
import pytest
from django.conf import settings
from django.test import Client
from rq import Worker

from studio import services
from tests.processes import output_of, start_worker, stop




def test_gpu_jobs_get_the_long_timeout_and_failure_ttl():
    job = services.enqueue("gpu", "operator.add", 2, 3)
    assert job.timeout == settings.GPU_JOB_TIMEOUT_S > 180
    assert job.failure_ttl == settings.JOB_FAILURE_TTL_S
    assert services.enqueue("default", "operator.add", 1, 1).timeout == settings.DEFAULT_JOB_TIMEOUT_S


@pytest.mark.django_db(transaction=True)
def test_documented_worker_command_runs_jobs_from_both_queues():
    gpu_job = services.enqueue("gpu", "operator.add", 2, 3)
    default_job = services.enqueue("default", "operator.mul", 4, 5)
    worker = start_worker("--burst")
    try:
        worker.wait(timeout=120)
    finally:
        stop(worker)
    assert worker.returncode == 0, output_of(worker)
    gpu_job.refresh()
    default_job.refresh()
    assert gpu_job.return_value() == 5
    assert default_job.return_value() == 20


@pytest.mark.django_db
def test_healthz_without_worker_is_503():
    response = Client().get("/healthz")
    body = response.json()
    assert response.status_code == 503
    assert body["database"]["ok"] and body["redis"]["ok"]
    assert body["worker"] == {"ok": False, "gpu_workers": 0}


@pytest.mark.django_db(transaction=True)
def test_healthz_with_live_worker_is_200():
    worker = start_worker()
    try:
        deadline = time.monotonic() + 60
        while not Worker.all(queue=django_rq.get_queue("gpu")) and time.monotonic() < deadline:
            time.sleep(0.2)
        response = Client().get("/healthz")
        assert response.status_code == 200, response.content
        assert response.json()["worker"] == {"ok": True, "gpu_workers": 1}
    finally:
        stop(worker)


@pytest.mark.django_db
def test_healthz_reports_redis_down_and_logs_why(monkeypatch, caplog):
    monkeypatch.setitem(settings.RQ_QUEUES["gpu"], "URL", "redis://127.0.0.1:1/0")
    response = Client().get("/healthz")
    body = response.json()
    assert response.status_code == 503 and body["ok"] is False
    assert body["database"]["ok"] is True
    # The public answer names the failing part only; the cause is in the log for staff.
    assert body["redis"] == {"ok": False} and body["worker"] == {"ok": False, "gpu_workers": 0}
    assert "ConnectionError" not in response.content.decode()
    logged = [r for r in caplog.records if r.name == "studio.health"]
    assert "Redis is not reachable" in logged[0].getMessage() and logged[0].exc_info[0].__name__ == "ConnectionError"
    # The next probe during the same outage logs nothing more; the recovery is one line.
    caplog.clear()
    Client().get("/healthz")
    assert not [r for r in caplog.records if r.name == "studio.health"]
    monkeypatch.undo()
    Client().get("/healthz")
    assert [r.getMessage() for r in caplog.records if r.name == "studio.health"] == [
        "health check: Redis is reachable again", "health check: the worker registry in Redis is reachable again",
    ]
