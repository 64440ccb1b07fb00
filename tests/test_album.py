"""The album and a portrait's page: the calibrated likeness, and sorting by it."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from django.core.files.base import ContentFile
from django.urls import reverse
from PIL import Image

from pipeline.faces import DLIB_THRESHOLDS, LIKENESS_AT_LIMIT, likeness
from studio.models import Persona, Portrait


def jpeg() -> ContentFile:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 64), "grey").save(buffer, format="JPEG")
    return ContentFile(buffer.getvalue(), name="portrait.jpg")


@pytest.fixture
def portraits(owner) -> list[Portrait]:
    """Three portraits of one double: cosines 0.95, 0.99 and none (no face found), oldest first."""
    persona = Persona.objects.create(owner=owner, name="Me")
    return [Portrait.objects.create(persona=persona, image=jpeg(), identity_similarity=s) for s in (0.95, 0.99, None)]


def test_the_likeness_reads_the_same_for_every_backend_at_its_limit():
    for limit in (0.40, 1.14):  # dlib's and insightface's same-person distances
        thresholds = replace(DLIB_THRESHOLDS, same_person_distance=limit)
        at_limit = 1.0 - limit**2 / 2  # the cosine of two unit vectors `limit` apart
        assert likeness(at_limit, thresholds) == pytest.approx(LIKENESS_AT_LIMIT)
        assert likeness(1.0, thresholds) == 100.0
        assert likeness(-1.0, thresholds) < LIKENESS_AT_LIMIT - 20  # opposite embeddings
    # dlib: two photos of one person (distance 0.3) above 60, two strangers (0.6) well below.
    assert likeness(1 - 0.3**2 / 2, DLIB_THRESHOLDS) == pytest.approx(70.0)
    assert likeness(1 - 0.6**2 / 2, DLIB_THRESHOLDS) == pytest.approx(40.0)


def test_the_album_shows_each_likeness_out_of_100_and_sorts_by_it(portraits, owner_client):
    assert [p.likeness for p in portraits] == [round(likeness(0.95, DLIB_THRESHOLDS)), round(likeness(0.99, DLIB_THRESHOLDS)), None]
    newest = owner_client.get(reverse("album")).content.decode()
    assert f"likeness {portraits[0].likeness}/100" in newest and f"likeness {portraits[1].likeness}/100" in newest
    assert newest.count("/100</span>") == 2  # the portrait with no face found shows none

    def order(page: str) -> list[int]:
        return sorted((p.id for p in portraits), key=lambda i: page.index(f'id="portrait-{i}"'))

    assert order(newest) == [portraits[2].id, portraits[1].id, portraits[0].id]
    alike = owner_client.get(reverse("album") + "?sort=likeness").content.decode()
    assert order(alike) == [portraits[1].id, portraits[0].id, portraits[2].id]
    assert "<strong>most alike first</strong>" in alike and "<strong>newest first</strong>" in newest


def test_a_portraits_page_says_what_its_likeness_means(portraits, owner_client, other_client, client):
    url = reverse("portrait", args=[portraits[1].id])
    page = owner_client.get(url).content.decode()
    assert f"Likeness {portraits[1].likeness}/100: how alike our face checker finds this portrait" in page
    assert "60 or more reads as the same person." in page
    assert other_client.get(url).status_code == 404
    assert client.get(url).status_code == 302
    assert other_client.get(reverse("album") + "?sort=likeness").content.decode().count('class="portrait"') == 0


def test_the_likeness_shown_is_to_the_held_out_photo_with_the_copy_paste_gap(owner, owner_client):
    """Where the double has a held-out photo, the likeness shown and sorted by is to that photo; the
    page also says how much closer the portrait is to the photo fused in (copy-paste)."""
    persona = Persona.objects.create(owner=owner, name="Me")
    pasted = Portrait.objects.create(persona=persona, image=jpeg(), identity_similarity=0.99, held_out_similarity=0.90)
    alike = Portrait.objects.create(persona=persona, image=jpeg(), identity_similarity=0.95, held_out_similarity=0.94)
    assert pasted.likeness == round(likeness(0.90, DLIB_THRESHOLDS))
    assert pasted.copy_paste == round(likeness(0.99, DLIB_THRESHOLDS)) - round(likeness(0.90, DLIB_THRESHOLDS)) > 0
    page = owner_client.get(reverse("portrait", args=[pasted.id])).content.decode()
    assert f"Likeness {pasted.likeness}/100: how alike our face checker finds this portrait and a photo of yours that was kept out of training." in page
    assert f"It is {pasted.copy_paste} points more alike to the photo whose face was fused in" in page
    # Sorted by the likeness shown: the one more like the unseen photo first, though the other is
    # more like the reference.
    album = owner_client.get(reverse("album") + "?sort=likeness").content.decode()
    assert album.index(f'id="portrait-{alike.id}"') < album.index(f'id="portrait-{pasted.id}"')
