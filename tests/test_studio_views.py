"""Home, digital-double pages and account: owner / other person / anonymous."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from studio.models import Persona

pytestmark = pytest.mark.django_db


def test_anonymous_home_is_the_landing_page():
    response = Client().get(reverse("home"))
    assert response.status_code == 200
    assert reverse("signup") in response.content.decode()


def test_home_lists_only_own_doubles(owner_client, persona, other_user):
    Persona.objects.create(owner=other_user, name="Someone else")
    body = owner_client.get(reverse("home")).content.decode()
    assert persona.name in body
    assert "Someone else" not in body
    assert 'ws-connect="/ws/jobs/"' in body


def test_create_double(owner_client, owner):
    response = owner_client.post(reverse("persona_create"), {"name": "  Holiday me  "})
    persona = Persona.objects.get(owner=owner)
    assert persona.name == "Holiday me"
    assert response["Location"] == reverse("persona", args=[persona.id])


def test_create_double_without_name_shows_error(owner_client, owner):
    response = owner_client.post(reverse("persona_create"), {"name": ""})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert not Persona.objects.filter(owner=owner).exists()


def test_a_forms_post_url_opened_later_leads_back_to_its_page(owner_client, other_client, persona):
    """A refused form is shown at its POST URL: a reload or a bookmark of it used to be a blank 405."""
    home = reverse("home")
    assert owner_client.get(reverse("persona_create"))["Location"] == home
    page = reverse("persona", args=[persona.id])
    for name in ("face_consent", "photo_upload"):
        assert owner_client.get(reverse(name, args=[persona.id]))["Location"] == page
        assert other_client.get(reverse(name, args=[persona.id]), follow=True).status_code == 404
    assert owner_client.put(reverse("persona_create")).status_code == 405


def test_a_too_long_name_is_refused_in_plain_words(owner_client, owner):
    response = owner_client.post(reverse("persona_create"), {"name": "x" * 100}, headers={"accept-language": "zh-CN"})
    assert response.status_code == 400
    assert "名字最多 80 个字符（现在有 100 个）。" in response.content.decode()
    assert not Persona.objects.filter(owner=owner).exists()


def test_create_double_needs_login():
    response = Client().post(reverse("persona_create"), {"name": "x"})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert not Persona.objects.exists()


def test_double_page_owner_other_anonymous(owner_client, other_client, persona):
    url = reverse("persona", args=[persona.id])
    assert owner_client.get(url).status_code == 200
    assert other_client.get(url).status_code == 404
    assert Client().get(url).status_code == 302


def test_htmx_get_of_a_double_page_is_its_body_for_the_owner_only(owner_client, other_client, persona):
    """What the page fetches when the status pushed over the socket is not the one it shows (site.js)."""
    url = reverse("persona", args=[persona.id])
    response = owner_client.get(url, HTTP_HX_REQUEST="true")
    body = response.content.decode()
    assert response.status_code == 200 and body.startswith(f'<div id="persona-{persona.id}-body" data-status="draft"')
    assert "HX-Request" in response["Vary"]  # a cache must not serve the body as the page
    assert "<html" not in body and "Before you upload" in body  # a new double: the photos panel
    persona.status = Persona.Status.READY
    persona.save()
    body = owner_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "Choose templates" in body and "Before you upload" not in body
    assert other_client.get(url, HTTP_HX_REQUEST="true").status_code == 404
    signed_out = Client().get(url, HTTP_HX_REQUEST="true", HTTP_HX_CURRENT_URL=f"http://testserver{url}")
    assert signed_out.headers["HX-Redirect"] == f"{reverse('login')}?next={url}"  # the whole tab (test_error_pages)


def test_unknown_double_is_404(owner_client):
    assert owner_client.get(reverse("persona", args=[999999])).status_code == 404


def test_account_page(owner_client):
    response = owner_client.get(reverse("account"))
    assert response.status_code == 200
    assert reverse("password_change") in response.content.decode()
    assert Client().get(reverse("account")).status_code == 302


def test_pages_send_csrf_token_on_htmx_requests(owner_client):
    body = owner_client.get(reverse("home")).content.decode()
    assert "hx-headers='{\"X-CSRFToken\": \"" in body
    assert "vendor/htmx-2.0.11.min.js" in body and "vendor/htmx-ext-ws-2.0.4.js" in body
