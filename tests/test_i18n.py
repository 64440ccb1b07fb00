"""English and Simplified Chinese: the switch, and pages rendered in each."""

from __future__ import annotations

from pathlib import Path

import polib
import pytest
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent


def test_signup_page_in_english():
    body = Client(headers={"accept-language": "en"}).get(reverse("signup")).content.decode()
    assert "Create your account" in body
    assert '<html lang="en">' in body


def test_signup_page_in_chinese():
    body = Client(headers={"accept-language": "zh-CN"}).get(reverse("signup")).content.decode()
    assert "创建账户" in body
    assert '<html lang="zh-hans">' in body
    assert "Create your account" not in body


def test_language_switch_sticks():
    client = Client()
    response = client.post(reverse("set_language"), {"language": "zh-hans", "next": reverse("signup")})
    assert response.status_code == 302
    assert "创建账户" in client.get(reverse("signup")).content.decode()


def test_our_chinese_replaces_some_of_djangos_own():
    """studio/django_wording.py: a full-width colon after labels, and plainer words for e-mail."""
    chinese = Client(headers={"accept-language": "zh-CN"})
    signup = chinese.post(reverse("signup"), {"username": "a", "email": "bad", "password1": "x", "password2": "x"})
    body = signup.content.decode()
    assert "用户名：</label>" in body and "用户名:" not in body
    assert "请输入有效的电子邮箱地址。" in body and "Email 地址" not in body
    assert "电子邮箱：</label>" in chinese.get(reverse("password_reset")).content.decode()


@pytest.mark.parametrize("accept", ["en", "zh-CN"])
def test_each_language_is_named_in_itself(accept):
    """So a person who cannot read the current language still finds their own."""
    body = Client(headers={"accept-language": accept}).get(reverse("signup")).content.decode()
    assert 'lang="en">English</button>' in body and 'lang="zh-hans">简体中文</button>' in body


def test_switching_language_on_a_refused_form_goes_back_to_the_form_page(owner_client):
    """The refused form's page answers a POST; its URL would answer the switch's GET with a 405."""
    home = "http://testserver" + reverse("home")
    page = owner_client.post(reverse("persona_create"), {"name": ""}, headers={"referer": home})
    assert page.status_code == 400
    assert f'name="next" value="{home}"' in page.content.decode()
    switched = owner_client.post(reverse("set_language"), {"language": "zh-hans", "next": home})
    assert switched.status_code == 302 and owner_client.get(switched["Location"]).status_code == 200


def test_translations_are_complete_and_compiled():
    catalog = polib.pofile(str(ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"))
    assert catalog.untranslated_entries() == []
    assert catalog.fuzzy_entries() == []
    compiled = polib.mofile(str(ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.mo"))
    as_compiled = {entry.msgid: entry.msgstr or entry.msgstr_plural for entry in compiled}
    as_written = {entry.msgid: entry.msgstr or entry.msgstr_plural for entry in catalog.translated_entries()}
    assert as_compiled == as_written, "recompile the catalog: the .mo is older than the .po"
