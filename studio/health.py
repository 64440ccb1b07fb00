"""What /healthz reports: can we reach the database and Redis, and is a GPU worker alive.

The endpoint is public (load balancers call it), so a failure says only which part failed; what
went wrong is logged for staff.
"""

from __future__ import annotations

import logging

import django_rq
from django.db import connection
from rq import Worker

logger = logging.getLogger(__name__)

# Parts found failing by this process: a probe every few seconds logs an outage's traceback once,
# when it starts, and a line when it ends.
_failing: set[str] = set()


def _failed(part: str, **extra) -> dict:
    if part not in _failing:
        _failing.add(part)
        logger.warning("health check: %s is not reachable", part, exc_info=True)
    return {"ok": False, **extra}


def _reached(part: str, **extra) -> dict:
    if part in _failing:
        _failing.discard(part)
        logger.warning("health check: %s is reachable again", part)
    return {"ok": True, **extra}


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return _reached("the database")
    except Exception:  # noqa: BLE001  (any failure is the answer)
        return _failed("the database")


def check_redis() -> dict:
    try:
        django_rq.get_connection("gpu").ping()
        return _reached("Redis")
    except Exception:  # noqa: BLE001
        return _failed("Redis")


def check_workers() -> dict:
    """Live RQ workers that listen on the gpu queue. A worker's registration expires WORKER_TTL_S
    after its last beat (studio.worker), so a dead one leaves the count within seconds, and one
    registers again after a Redis restart."""
    try:
        workers = Worker.all(queue=django_rq.get_queue("gpu"))
        return {**_reached("the worker registry in Redis"), "ok": len(workers) > 0, "gpu_workers": len(workers)}
    except Exception:  # noqa: BLE001
        return _failed("the worker registry in Redis", gpu_workers=0)
