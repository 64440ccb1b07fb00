"""The login lockout's scope (one username from one address) and its end after
LOGIN_LOCKOUT_MINUTES: a lockout must not shut out other people, nor one person for ever."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.urls import reverse

from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

HERE, ELSEWHERE = "203.0.113.7", "198.51.100.9"


def log_in(username: str, password: str, address: str):
    return Client().post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.fixture
def owner_locked_out_here(owner, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        log_in("owner", "wrong password", HERE)
    response = log_in("owner", PASSWORD, HERE)
    assert response.status_code == 429 and "Too many failed logins" in response.content.decode()


def signed_in(response) -> bool:
    return response.status_code == 302 and response["Location"] == reverse("home")


def test_another_username_from_the_same_address_still_logs_in(owner_locked_out_here, other_user):
    assert signed_in(log_in("other", PASSWORD, HERE))


def test_the_same_username_from_another_address_still_logs_in(owner_locked_out_here):
    assert signed_in(log_in("owner", PASSWORD, ELSEWHERE))


def test_the_lockout_ends_after_login_lockout_minutes(owner_locked_out_here, settings):
    """The failures are moved back in time: just inside the lockout still refuses, just past it
    the right password works."""
    lockout = settings.AXES_COOLOFF_TIME
    assert lockout == timedelta(minutes=15)  # the README's default LOGIN_LOCKOUT_MINUTES
    attempt = AccessAttempt.objects.get(username="owner", ip_address=HERE)

    attempt.attempt_time -= lockout - timedelta(minutes=1)
    attempt.save()
    assert log_in("owner", PASSWORD, HERE).status_code == 429

    attempt.attempt_time -= timedelta(minutes=2)
    attempt.save()
    assert signed_in(log_in("owner", PASSWORD, HERE))
