"""Real worker and web server processes for tests, on the test database and the test redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dj_database_url
from django.conf import settings
from django.db import connection

from photobooth.dev import web_server_command

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


def start_web_server(port: int, data_dir: Path, **env: str) -> subprocess.Popen:
    """The site served as `make run` serves it (photobooth.dev.web_server_command) on this test's
    database, with `data_dir` as its DATA_DIR; returns once it answers a page."""
    server = subprocess.Popen(
        web_server_command(port),
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url_for_processes(), "DATA_DIR": str(data_dir), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/signup/", timeout=2)
            return server
        except urllib.error.HTTPError:
            return server  # it answers
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"the web server did not start: {server.communicate()[0][-4000:]!r}") from None
            time.sleep(0.3)


def wait_for(condition, timeout_s: float, what: str):
    """Polls `condition` until it returns something true (returned), or fails the test naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
