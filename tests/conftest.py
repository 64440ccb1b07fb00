"""Fixtures for the site's tests: an owner, another person, and their signed-in clients."""

from __future__ import annotations

import django_rq
import pytest
import torch
from django.contrib.auth.models import User
from django.test import Client
from django.utils import translation

from studio.models import Persona

PASSWORD = "correct horse battery staple"

# Two torch threads on CI's two cores made tiny training steps swing from 0.06 s to 9 s.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def empty_redis():
    """Every test starts and ends with the test redis-server empty: no queued job leaks across."""
    connection = django_rq.get_connection("gpu")
    connection.flushdb()
    yield
    connection.flushdb()


@pytest.fixture(autouse=True)
def english():
    """Each test starts in English, whatever language an earlier test's request switched to."""
    translation.activate("en")
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def private_media(settings, tmp_path):
    """Each test stores media in its own empty folder, so tests can count files."""
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


@pytest.fixture(autouse=True)
def training_dir(settings, tmp_path):
    """Each test trains in its own empty folder, so tests can see what a build leaves."""
    settings.TRAINING_DIR = tmp_path / "training"
    return settings.TRAINING_DIR


@pytest.fixture
def owner(db) -> User:
    return User.objects.create_user("owner", "owner@example.com", PASSWORD)


@pytest.fixture
def other_user(db) -> User:
    return User.objects.create_user("other", "other@example.com", PASSWORD)


@pytest.fixture
def owner_client(owner) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def other_client(other_user) -> Client:
    client = Client()
    client.force_login(other_user)
    return client


@pytest.fixture
def staff_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("staff", "staff@example.com", "x", is_staff=True, is_superuser=True))
    return client


@pytest.fixture
def persona(owner) -> Persona:
    return Persona.objects.create(owner=owner, name="Me")
