"""Sign-up, log-in throttling, CSRF, password change and reset, logout."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.core import mail
from django.test import Client
from django.urls import reverse

from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def signup(client: Client, headers: dict | None = None, **overrides) -> object:
    data = {"username": "newperson", "email": "new@example.com", "password1": PASSWORD, "password2": PASSWORD}
    data.update(overrides)
    return client.post(reverse("signup"), data, headers=headers)


def test_signup_creates_account_and_logs_in(client):
    response = signup(client)
    assert response.status_code == 302
    assert User.objects.get(username="newperson").email == "new@example.com"
    assert client.get(reverse("home")).context["user"].username == "newperson"


def test_signup_with_taken_name_shows_form_error(client, owner):
    response = signup(client, username="owner", email="someone@example.com")
    assert response.status_code == 200
    assert "A user with that username already exists." in response.content.decode()
    assert User.objects.filter(username="owner").count() == 1


def test_signup_with_weak_password_shows_form_error(client):
    response = signup(client, password1="12345678", password2="12345678")
    body = response.content.decode()
    assert response.status_code == 200
    assert "This password is too common." in body
    assert not User.objects.filter(username="newperson").exists()


def test_signup_with_mismatched_passwords_shows_form_error(client):
    response = signup(client, password2=PASSWORD + "!")
    assert response.status_code == 200
    assert "The two password fields didn’t match." in response.content.decode()
    assert not User.objects.filter(username="newperson").exists()


def test_a_username_in_any_alphabet_is_taken_and_a_space_is_refused_in_words_that_say_so(client):
    refused = signup(client, username="小明 x", email="xm@example.com", headers={"accept-language": "zh-CN"})
    assert "用户名只能使用任何文字的字母、数字和 @ . + - _，不能有空格。" in refused.content.decode()
    assert "英文字母" not in refused.content.decode()  # Django's own words said English letters only
    assert signup(client, username="小明", email="xm@example.com").status_code == 302
    assert User.objects.filter(username="小明").exists()


def test_signup_does_not_tell_whether_an_email_has_an_account(client, owner):
    response = signup(client, email="OWNER@example.com")
    assert response.status_code == 302
    assert User.objects.get(username="newperson").email == "OWNER@example.com"
    client.post(reverse("logout"))
    client.post(reverse("password_reset"), {"email": "owner@example.com"})
    # A reset reaches both accounts with the address, each mail naming its own.
    names = sorted(re.search(r"your Photobooth account “(\S+)”", m.body).group(1) for m in mail.outbox)
    assert names == ["newperson", "owner"]


def test_signed_in_person_is_sent_home_from_signup(owner_client):
    response = owner_client.get(reverse("signup"))
    assert response.status_code == 302 and response["Location"] == reverse("home")


def test_login_with_right_password(client, owner):
    response = client.post(reverse("login"), {"username": "owner", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("home")
    assert client.get(reverse("home")).context["user"] == owner


def test_wrong_credentials_are_throttled(client, owner, settings):
    """20 wrong passwords: form errors first, then the throttle page (429), never a 500."""
    statuses = []
    for _ in range(20):
        response = client.post(reverse("login"), {"username": "owner", "password": "wrong password"})
        statuses.append(response.status_code)
    limit = settings.AXES_FAILURE_LIMIT
    assert statuses[: limit - 1] == [200] * (limit - 1)
    assert set(statuses[limit:]) == {429}
    assert "Too many failed logins" in response.content.decode()
    # Even the right password is refused while locked out.
    response = client.post(reverse("login"), {"username": "owner", "password": PASSWORD})
    assert response.status_code == 429


def test_wrong_password_shows_form_error(client, owner):
    response = client.post(reverse("login"), {"username": "owner", "password": "nope"})
    assert response.status_code == 200
    assert "Please enter a correct username and password." in response.content.decode()


def test_post_without_csrf_token_is_refused(owner):
    client = Client(enforce_csrf_checks=True)
    response = client.post(reverse("login"), {"username": "owner", "password": PASSWORD})
    assert response.status_code == 403
    page = response.content.decode()
    assert "This page is out of date" in page and "Traceback" not in page
    assert not client.get(reverse("home")).context["user"].is_authenticated


def test_logout_needs_post_and_ends_session(owner_client, owner):
    """A GET (a link, a prefetch, an image tag on another site) must not log anyone out."""
    assert owner_client.get(reverse("logout")).status_code == 405
    assert owner_client.get(reverse("home")).context["user"] == owner
    response = owner_client.post(reverse("logout"))
    assert response.status_code == 302
    assert not owner_client.get(reverse("home")).context["user"].is_authenticated


def test_password_change(owner_client, owner):
    new_password = PASSWORD + " again"
    response = owner_client.post(
        reverse("password_change"),
        {"old_password": PASSWORD, "new_password1": new_password, "new_password2": new_password},
    )
    assert response.status_code == 302
    owner.refresh_from_db()
    assert owner.check_password(new_password)


def reset_password(client: Client, email: str, new_password: str) -> object:
    """Asks for a reset, follows the mailed link and sets the new password; the last answer."""
    assert client.post(reverse("password_reset"), {"email": email}).status_code == 302
    link = re.search(r"http://testserver(/accounts/reset/\S+/)", mail.outbox[-1].body).group(1)
    form_page = client.get(link, follow=True)
    assert form_page.context["validlink"]
    return client.post(form_page.redirect_chain[-1][0], {"new_password1": new_password, "new_password2": new_password})


def test_password_reset_sends_working_link(client, owner):
    new_password = "a brand new passphrase"
    assert reset_password(client, "owner@example.com", new_password).status_code == 302
    assert len(mail.outbox) == 1
    owner.refresh_from_db()
    assert owner.check_password(new_password)


def test_a_password_reset_lifts_the_login_lockout(client, owner, settings):
    """The lockout page says "reset your password": after the reset the new password works."""
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(reverse("login"), {"username": "owner", "password": "wrong password"})
    assert client.post(reverse("login"), {"username": "owner", "password": PASSWORD}).status_code == 429
    reset_password(client, "owner@example.com", "a brand new passphrase")
    response = client.post(reverse("login"), {"username": "owner", "password": "a brand new passphrase"})
    assert response.status_code == 302 and response["Location"] == reverse("home")


def test_the_reset_mail_is_in_the_page_language_and_names_the_site(client, owner):
    client.post(reverse("password_reset"), {"email": "owner@example.com"}, headers={"accept-language": "zh-CN"})
    (sent,) = mail.outbox
    assert sent.subject == "设置新的 Photobooth 写真馆密码"
    assert "你的 Photobooth 写真馆账户“owner”" in sent.body and "http://testserver/accounts/reset/" in sent.body
    words = sent.body.replace("Photobooth", "").replace("owner", "")
    assert not re.search(r"[A-Za-z]{3,}", words.split("http")[0] + words.split("/\n")[-1])  # no English left
    assert "testserver 团队" not in sent.body


def test_logging_out_says_so(owner_client):
    response = owner_client.post(reverse("logout"), follow=True)
    assert "You are logged out." in response.content.decode()
