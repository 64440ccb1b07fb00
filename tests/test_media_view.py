"""Private media: the owner gets their file; another person and anonymous visitors get 404."""

from __future__ import annotations

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from django.urls import reverse

from studio.models import Photo, Template

pytestmark = pytest.mark.django_db


@pytest.fixture
def photo(persona) -> Photo:
    photo = Photo(persona=persona)
    photo.image.save("selfie.jpg", ContentFile(b"\xff\xd8 not really a jpeg"), save=True)
    return photo


def media_url(name: str) -> str:
    return reverse("media_file", args=[name])


def test_file_is_stored_under_its_owner_folder(photo, owner):
    assert photo.image.name.startswith(f"users/{owner.id}/photos/")
    assert photo.owner_id == owner.id


def test_owner_gets_own_file(owner_client, photo):
    response = owner_client.get(media_url(photo.image.name))
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == b"\xff\xd8 not really a jpeg"
    assert response["Content-Type"] == "image/jpeg"
    assert "no-store" in response["Cache-Control"]


def test_other_person_gets_404(other_client, photo):
    assert other_client.get(media_url(photo.image.name)).status_code == 404


def test_anonymous_gets_404(photo):
    assert Client().get(media_url(photo.image.name)).status_code == 404


@pytest.fixture
def trick_targets(owner, other_user, private_media):
    """Every file the tricks aim at exists, so only the path check in media_file refuses them."""
    for name in (f"users/{other_user.id}/photos/x.jpg", f"users/{owner.id}/photos/x.jpg"):
        assert default_storage.save(name, ContentFile(b"someone's selfie")) == name
    (private_media.parent / "db.sqlite3").write_bytes(b"the database")


@pytest.mark.parametrize(
    "trick",
    ["users/{id}/../{other}/photos/x.jpg", "users/{id}/./photos/x.jpg", "/etc/passwd", "../db.sqlite3"],
)
def test_path_tricks_get_404(owner_client, owner, other_user, trick_targets, trick):
    name = trick.format(id=owner.id, other=other_user.id)
    assert owner_client.get("/media/" + name).status_code == 404


def test_staff_cannot_climb_out_of_the_gallery_into_a_persons_folder(staff_client, other_user, trick_targets):
    """Staff may read any gallery file: a gallery path that climbs out must not reach a selfie."""
    assert staff_client.get(f"/media/gallery/../users/{other_user.id}/photos/x.jpg").status_code == 404


def test_missing_own_file_gets_404(owner_client, owner):
    assert owner_client.get(media_url(f"users/{owner.id}/photos/missing.jpg")).status_code == 404


def test_gallery_files_are_for_signed_in_people(other_client, owner):
    template = Template(title="Portrait", uploaded_by=owner, published=True)
    template.image.save("t.png", ContentFile(b"png bytes"), save=True)
    assert template.image.name.startswith("gallery/")
    assert other_client.get(media_url(template.image.name)).status_code == 200
    assert Client().get(media_url(template.image.name)).status_code == 404


@pytest.mark.django_db(transaction=True)
def test_deleting_a_row_deletes_its_file(persona):
    photo = Photo(persona=persona)
    photo.image.save("selfie.jpg", ContentFile(b"data"), save=True)
    name = photo.image.name
    assert default_storage.exists(name)
    persona.delete()
    assert not default_storage.exists(name)
