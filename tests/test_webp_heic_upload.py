"""WebP and HEIC, the formats phones send, through the site's upload form (not only the pipeline's
loader): accepted, analysed as a face, and stored as a JPEG of the same picture."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from studio.models import Photo
from tests.test_photo_upload import consented, encoded, face_image, upload  # noqa: F401 (consented: a fixture)

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("name", "fmt", "magic"),
    [
        ("selfie.webp", "WEBP", b"WEBP"),
        ("IMG_0001.HEIC", "HEIF", b"ftypheic"),
        ("photo-1.jpg", "HEIF", b"ftypheic"),  # as the page's script names it: judged by content
    ],
)
def test_a_phone_format_is_accepted_and_stored_as_jpeg(owner_client, persona, consented, name, fmt, magic):
    original = face_image("obama.jpg")
    data = encoded(original, fmt, quality=90)
    assert magic in data[:32]  # really that format

    response = upload(owner_client, persona, (name, data))

    assert response.status_code == 200
    photo = Photo.objects.get(persona=persona)
    assert photo.status == Photo.Status.ACCEPTED, photo.reason_code
    assert photo.original_name == name
    assert name in response.content.decode()  # its card names it
    stored = Image.open(io.BytesIO(photo.image.read()))
    assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", original.size)
    difference = np.abs(np.asarray(stored, dtype=np.int16) - np.asarray(original, dtype=np.int16)).mean()
    assert difference < 8  # the same picture, not a blank or a mangled one
