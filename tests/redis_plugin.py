"""pytest plugin: a private redis-server and data folder, set up before Django's settings load.

Loaded with `-p tests.redis_plugin` (pytest.ini). Its hook runs before pytest-django's, so
REDIS_URL and DATA_DIR point at throw-away resources when settings are read. RQ and the
channel layer in tests always talk to this real server, never to a fake.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from photobooth.dev import RedisServer

_server: RedisServer | None = None
_data_dir: tempfile.TemporaryDirectory | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    global _server, _data_dir
    _server = RedisServer()
    # In the system's temporary folder, not in the one a parent run gave (xdist's workers inherit
    # it): nested, the paths grew past what a unix socket takes (Chromium's failed to start).
    base = os.environ.setdefault("PHOTOBOOTH_TEST_SYSTEM_TMPDIR", tempfile.gettempdir())
    _data_dir = tempfile.TemporaryDirectory(prefix="photobooth-test-data-", dir=base)
    os.environ["REDIS_URL"] = _server.url
    os.environ["DATA_DIR"] = _data_dir.name
    # Temporary files too (the workers' job folders among them), here and in the processes the
    # tests start: one run's, or one xdist worker's, never seen by another.
    temporary = os.path.join(_data_dir.name, "tmp")
    os.mkdir(temporary)
    os.environ["TMPDIR"] = tempfile.tempdir = temporary


def pytest_unconfigure(config) -> None:
    if _server:
        _server.stop()
    if _data_dir:
        _data_dir.cleanup()
