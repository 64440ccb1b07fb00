"""Real worker processes for tests, on the test database and the test redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dj_database_url
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url_for_processes() -> str:
    """DATABASE_URL of the database the tests are using right now (its test copy)."""
    database = connection.settings_dict
    if database["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{database['NAME']}"
    config = dj_database_url.parse(os.environ["DATABASE_URL"])
    auth = config["USER"] + (f":{config['PASSWORD']}" if config.get("PASSWORD") else "")
    return f"postgres://{auth}@{config['HOST']}:{config['PORT'] or 5432}/{database['NAME']}"


def start_worker(*extra: str, **env: str) -> subprocess.Popen:
    """`manage.py rqworker gpu default`, the documented worker command, on this test's media and
    training folders."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "rqworker", "gpu", "default", *extra],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url_for_processes(),
            "DATA_DIR": str(Path(settings.MEDIA_ROOT).parent),
            "TRAINING_DIR": str(settings.TRAINING_DIR),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
