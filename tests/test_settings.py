"""Settings from the environment: loud failures, Postgres by URL, a production config that passes check --deploy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from photobooth.env import env_bool, env_int, env_list, env_str

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "x7#kP2!vQ9@mL4$wR8^zT1&nB6*cY3(hJ5)fG0_dS-aE+uI=oK",
    "ALLOWED_HOSTS": "photos.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://photos.example.com",
    "DATABASE_URL": "postgres://photobooth@db.example.com:5432/photobooth",
    "REDIS_URL": "redis://redis.example.com:6379/0",
}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in PRODUCTION}
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_production_configuration_passes_check_deploy(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", DATA_DIR=str(tmp_path), **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "System check identified no issues (0 silenced)."


@pytest.mark.parametrize("missing", ["SECRET_KEY", "ALLOWED_HOSTS"])
def test_production_without_required_variable_fails_loudly(tmp_path, missing):
    env = {k: v for k, v in PRODUCTION.items() if k != missing}
    result = manage("check", DATA_DIR=str(tmp_path), **env)
    assert result.returncode != 0
    assert f"Set the environment variable {missing}" in result.stderr


def database_settings(*keys: str, **env: str) -> list[str]:
    """The default database's settings `keys`, as a process started with `env` reads them."""
    code = f"from django.conf import settings; print(*(settings.DATABASES['default'][k] for k in {keys!r}), sep='\\n')"
    result = manage("shell", "--no-imports", "-c", code, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_database_url_selects_postgres(tmp_path):
    url = "postgres://photobooth:secret@db.example.com:6543/photos"
    found = database_settings("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT", DATA_DIR=str(tmp_path),
                              DATABASE_URL=url)
    assert found == ["django.db.backends.postgresql", "photos", "photobooth", "secret", "db.example.com", "6543"]


def test_default_database_is_sqlite_in_the_data_folder(tmp_path):
    assert database_settings("ENGINE", "NAME", DATA_DIR=str(tmp_path)) == [
        "django.db.backends.sqlite3", str(tmp_path / "db.sqlite3")
    ]


def test_env_readers(monkeypatch):
    monkeypatch.setenv("PB_FLAG", "yes")
    monkeypatch.setenv("PB_NUMBER", "42")
    monkeypatch.setenv("PB_LIST", " a, b ,,c ")
    assert env_bool("PB_FLAG", False) is True
    assert env_int("PB_NUMBER", 0) == 42
    assert env_list("PB_LIST", []) == ["a", "b", "c"]
    assert env_str("PB_UNSET", "fallback") == "fallback"


@pytest.mark.parametrize(
    ("reader", "value", "message"),
    [
        (lambda: env_bool("PB_BAD", True), "maybe", "PB_BAD must be one of"),
        (lambda: env_int("PB_BAD", 1), "ten", "PB_BAD must be an integer"),
        (lambda: env_int("PB_BAD", 1, minimum=5), "3", "PB_BAD must be at least 5"),
        (lambda: env_str("PB_BAD"), "", "Set the environment variable PB_BAD"),
    ],
)
def test_env_readers_fail_loudly(monkeypatch, reader, value, message):
    monkeypatch.setenv("PB_BAD", value)
    with pytest.raises(ImproperlyConfigured, match=message):
        reader()
