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


def test_translations_are_complete_and_compiled():
    catalog = polib.pofile(str(ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"))
    assert catalog.untranslated_entries() == []
    assert catalog.fuzzy_entries() == []
    compiled = polib.mofile(str(ROOT / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.mo"))
    as_compiled = {entry.msgid: entry.msgstr or entry.msgstr_plural for entry in compiled}
    as_written = {entry.msgid: entry.msgstr or entry.msgstr_plural for entry in catalog.translated_entries()}
    assert as_compiled == as_written, "recompile the catalog: the .mo is older than the .po"
