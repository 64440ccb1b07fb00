"""What /healthz reports: can we reach the database and Redis, and is a GPU worker alive."""

from __future__ import annotations

import django_rq
from django.db import connection
from rq import Worker


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True}
    except Exception as error:  # noqa: BLE001  (any failure is the answer)
        return {"ok": False, "error": type(error).__name__}


def check_redis() -> dict:
    try:
        django_rq.get_connection("gpu").ping()
        return {"ok": True}
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "error": type(error).__name__}


def check_workers() -> dict:
    """Live RQ workers that listen on the gpu queue (RQ expires a dead worker's heartbeat)."""
    try:
        workers = Worker.all(queue=django_rq.get_queue("gpu"))
        return {"ok": len(workers) > 0, "gpu_workers": len(workers)}
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "error": type(error).__name__, "gpu_workers": 0}
