"""Requests the views never answer themselves: signed out under htmx, a stale CSRF token, a crash."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from studio import services

pytestmark = pytest.mark.django_db

HTMX_URLS = [
    ("post", "photo_upload", [1]),
    ("post", "photo_delete", [1]),
    ("post", "job_cancel", [1]),
    ("post", "job_retry", [1]),
    ("post", "job_dismiss", [1]),
    ("get", "jobs_panel", []),
]


@pytest.mark.parametrize(("method", "name", "args"), HTMX_URLS)
def test_signed_out_htmx_request_sends_the_window_to_login_and_back(method, name, args):
    page = "/personas/1/"
    response = getattr(Client(), method)(
        reverse(name, args=args), headers={"HX-Request": "true", "HX-Current-URL": f"http://testserver{page}"}
    )
    assert response.status_code == 200 and response.content == b""
    assert response.headers["HX-Redirect"] == f"{reverse('login')}?next={page}"


def test_a_signed_out_action_says_on_the_login_page_that_it_was_not_done():
    client = Client()
    response = client.post(reverse("photo_delete", args=[1]), headers={"HX-Request": "true"})
    login_page = client.get(response.headers["HX-Redirect"]).content.decode()
    assert "You were logged out, so that was not done. Please log in and try again." in login_page
    poll = client.get(reverse("jobs_panel"), headers={"HX-Request": "true"})
    assert "logged out" not in client.get(poll.headers["HX-Redirect"]).content.decode()  # a poll did nothing


@pytest.mark.parametrize("current", [None, "https://elsewhere.example/personas/1/"])
def test_without_a_page_of_this_site_to_go_back_to_login_leads_home(current):
    headers = {"HX-Request": "true", **({"HX-Current-URL": current} if current else {})}
    response = Client().post(reverse("photo_delete", args=[1]), headers=headers)
    assert response.headers["HX-Redirect"] == f"{reverse('login')}?next=/"


def test_signed_out_plain_request_is_redirected_to_login_as_before():
    response = Client().get(reverse("jobs_panel"))
    assert response.status_code == 302
    assert response.headers["Location"] == f"{reverse('login')}?next={reverse('jobs_panel')}"
    assert "HX-Redirect" not in response.headers


def test_signed_in_htmx_request_is_answered_by_its_view(owner_client):
    response = owner_client.get(reverse("jobs_panel"), headers={"HX-Request": "true"})
    assert response.status_code == 200 and "HX-Redirect" not in response.headers
    panel = response.content.decode()
    assert panel.startswith('<section id="jobs"') and "Nothing is running." in panel


@pytest.mark.parametrize(("language", "words"), [("en", "This page is out of date"), ("zh-CN", "这个页面已经过时")])
def test_a_form_with_a_stale_csrf_token_gets_a_readable_403(owner, language, words):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(reverse("persona_create"), {"name": "Me"}, headers={"accept-language": language})
    assert response.status_code == 403
    page = response.content.decode()
    assert words in page and "data-error-page" in page


@pytest.mark.parametrize(("language", "words"), [("en", "Something went wrong on our side"), ("zh-CN", "我们这边出了问题")])
def test_a_crash_gets_a_readable_500(owner, monkeypatch, language, words):
    def crash(owner):
        raise RuntimeError("a bug")

    monkeypatch.setattr(services, "panel_jobs", crash)
    client = Client(raise_request_exception=False)
    client.force_login(owner)
    response = client.get(reverse("jobs_panel"), headers={"accept-language": language})
    assert response.status_code == 500
    page = response.content.decode()
    assert words in page and "data-error-page" in page and "a bug" not in page
