"""DEBUG=0 with WhiteNoise's manifest storage: every page renders. A `{% static %}` name missing
from the manifest raises while rendering, so one would answer 500 on every page, and
`check --deploy` does not see it. Static files are collected by the production command."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

import photobooth.settings
from tests.processes import ROOT

pytestmark = pytest.mark.django_db

PRODUCTION = {"DEBUG": "0", "SECRET_KEY": "x" * 60, "ALLOWED_HOSTS": "testserver"}


@pytest.fixture
def production_static(settings, tmp_path, monkeypatch):
    """`manage.py collectstatic --noinput` run as in production, then this process switched to
    DEBUG off and to the static storage that settings.py chooses with DEBUG=0."""
    collected = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT, env={**os.environ, **PRODUCTION, "DATA_DIR": str(tmp_path)}, capture_output=True, text=True,
    )
    assert collected.returncode == 0, collected.stderr[-3000:]
    for name, value in PRODUCTION.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    production = runpy.run_path(str(Path(photobooth.settings.__file__)))
    assert production["STORAGES"]["staticfiles"]["BACKEND"] == "whitenoise.storage.CompressedManifestStaticFilesStorage"
    assert (Path(production["STATIC_ROOT"]) / "staticfiles.json").is_file()
    settings.DEBUG = False
    settings.STATIC_ROOT = production["STATIC_ROOT"]
    settings.STORAGES = {**settings.STORAGES, "staticfiles": production["STORAGES"]["staticfiles"]}


def rendered(client: Client, url: str, words: str) -> str:
    response = client.get(url)
    page = response.content.decode()
    assert response.status_code == 200, (url, page[:500])
    assert words in page, url
    return page


def assert_hashed_static_is_served(client: Client, page: str) -> None:
    """The page names the manifest's hashed files, and WhiteNoise serves them."""
    names = re.findall(r'(?:href|src)="(/static/[^"]+)"', page)
    assert names and all(re.search(r"\.[0-9a-f]{12}\.\w+$", name) for name in names), names
    for name in names:
        assert client.get(name).status_code == 200, name


def test_every_page_renders_with_debug_off(production_static, owner_client, persona):
    error_client = Client(raise_request_exception=False)  # as a browser sees a 500
    page = rendered(error_client, reverse("home"), "Portraits of you, in any style.")  # the landing page
    assert_hashed_static_is_served(Client(), page)
    rendered(error_client, reverse("signup"), 'name="password1"')
    rendered(error_client, reverse("login"), 'name="password"')

    owner_client.raise_request_exception = False
    rendered(owner_client, reverse("home"), persona.name)
    rendered(owner_client, reverse("gallery"), "<h1>Templates</h1>")
    rendered(owner_client, reverse("album"), "<h1>My album</h1>")
    rendered(owner_client, reverse("account"), "<h1>Account</h1>")
    page = rendered(owner_client, reverse("persona", args=[persona.id]), persona.name)
    assert "/static/js/upload." in page
    assert_hashed_static_is_served(owner_client, page)
