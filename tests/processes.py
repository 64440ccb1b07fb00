"""Real worker and web server processes for tests, on the test database and the test redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`command` with its output in a file, not a pipe: a pipe nobody reads while the test runs
    fills up (granian logs every request) and stops the process at its next line."""
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def output_of(process: subprocess.Popen) -> str:
    """What a process started here has printed so far."""
    process.log.seek(0)
    return process.log.read().decode(errors="replace")


def stop(process: subprocess.Popen, kill: bool = False, timeout_s: float = 30) -> str:
    """Terminates (or kills) the process and returns its output; one that has not ended in
    `timeout_s` is killed, so that no test leaves a process running into the next."""
    if process.poll() is None:
        process.kill() if kill else process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return output_of(process) + f"\n[killed: still running {timeout_s} s after SIGTERM]"
    return output_of(process)


def start_worker(*extra: str, **env: str) -> subprocess.Popen:
    """`manage.py rqworker gpu default`, the documented worker command, on this test's media and
    training folders."""
    return _start(
        [sys.executable, "manage.py", "rqworker", "gpu", "default", *extra],
        {
            **os.environ,
            "DATABASE_URL": database_url_for_processes(),
            "DATA_DIR": str(Path(settings.MEDIA_ROOT).parent),
            "TRAINING_DIR": str(settings.TRAINING_DIR),
            **env,
        },
    )


def start_web_server(port: int, data_dir: Path, **env: str) -> subprocess.Popen:
    """The site served as `make run` serves it (photobooth.dev.web_server_command) on this test's
    database, with `data_dir` as its DATA_DIR; returns once it answers a page."""
    server = _start(
        web_server_command(port),
        {**os.environ, "DATABASE_URL": database_url_for_processes(), "DATA_DIR": str(data_dir), **env},
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
                raise RuntimeError(f"the web server did not start: {stop(server, kill=True)[-4000:]}") from None
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
