"""Selfie uploads: consent, the bad-file corpus, metadata stripping, analysis on real faces."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import OperationalError, connection, transaction
from django.test import Client
from django.urls import reverse
import numpy as np
from PIL import Image

from studio import services, uploads
from tests.processes import ROOT
from studio.models import FaceConsent, Persona, Photo
from tests.pipeline.test_preprocess import (
    jpeg_with_bad_exif, mpo, png_with_bad_exif, png_with_junk_raw_profile, scan_bomb,
)

pytestmark = pytest.mark.django_db
FACES = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "faces"))


def face(name: str) -> bytes:
    return (FACES / name).read_bytes()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def face_image(name: str) -> Image.Image:
    return Image.open(FACES / name).convert("RGB")


def minimal_psd(width: int = 4, height: int = 4) -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + b"\x80" * (3 * width * height)


def stored_files() -> list[Path]:
    return sorted(path for path in Path(settings.MEDIA_ROOT).rglob("*") if path.is_file())


@pytest.fixture
def consented(owner):
    services.give_face_consent(owner)


def upload(client: Client, persona, *files: tuple[str, bytes], htmx: bool = False, follow: bool | None = None):
    payload = [SimpleUploadedFile(name, data) for name, data in files]
    headers = {"HX-Request": "true"} if htmx else {}
    # Without htmx a stored batch redirects to the persona page (its refusals shown there).
    return client.post(reverse("photo_upload", args=[persona.id]), {"photos": payload}, headers=headers,
                       follow=not htmx if follow is None else follow)


BAD_FILES = {
    "empty": ("empty.jpg", lambda: b"", "This file is empty."),
    "truncated_jpeg": ("cut.jpg", lambda: face("obama.jpg")[:40_000], "not a photo we can read"),
    "png_bomb": ("bomb.png", lambda: encoded(Image.new("1", (30_000, 30_000)), "PNG"), "too many pixels"),
    "100_megapixels": ("huge.png", lambda: encoded(Image.new("L", (10_000, 10_000)), "PNG"), "too many pixels"),
    "svg_as_jpg": ("vector.jpg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "not a photo we can read"),
    "eps_as_jpg": ("print.jpg", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not supported"),
    "psd_as_jpg": ("layers.jpg", minimal_psd, "not supported"),
    "html_polyglot": ("page.jpg", lambda: b"GIF89a<html><body><script>alert(1)</script></body></html>", "not a photo we can read"),
    "gif": ("anim.jpg", lambda: encoded(Image.new("RGB", (8, 8)), "GIF"), "not supported"),
    "text": ("notes.jpg", lambda: b"just some text, not an image at all", "not a photo we can read"),
    "30_megabytes": ("big.jpg", lambda: b"\xff\xd8\xff\xe0" + os.urandom(30 * 2**20), "larger than 15 MB"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_file_is_refused_and_leaves_nothing(owner_client, persona, consented, kind):
    name, make, message = BAD_FILES[kind]
    before = stored_files()
    response = upload(owner_client, persona, (name, make()))
    assert response.status_code in (200, 400)  # a per-file refusal, or the form's own error
    assert message in response.content.decode()
    assert not Photo.objects.exists()
    assert stored_files() == before



@pytest.mark.parametrize("htmx", [True, False])
def test_an_empty_file_is_refused_by_name_and_the_rest_of_the_batch_is_kept(owner_client, persona, consented, htmx):
    response = upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), ("empty.jpg", b""), htmx=htmx)
    assert response.status_code == 200
    shown = "empty.jpg</strong>: This file is empty." if htmx else "empty.jpg: This file is empty."  # panel / message
    assert shown in response.content.decode()
    assert Photo.objects.count() == 1



def test_the_same_file_twice_is_stored_once(owner_client, persona, consented):
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), ("copy.jpg", face("obama.jpg")))
    again = upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), ("obama2.jpg", face("obama2.jpg")))
    assert Photo.objects.count() == 2
    assert "obama.jpg: This photo is already among this double&#x27;s photos." in again.content.decode()

@pytest.mark.django_db(transaction=True)
def test_photos_stored_before_migration_0005_are_hashed_so_a_second_copy_is_refused(owner_client, persona, consented):
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), ("obama2.jpg", face("obama2.jpg")))
    first, gone = Photo.objects.order_by("id")
    hashed = first.sha256
    gone.image.delete(save=False)  # a raw selfie deleted once its double was built
    Photo.objects.update(sha256="")  # as 0005 left the photos stored before it
    call_command("migrate", "studio", "0005", verbosity=0)
    call_command("migrate", "studio", verbosity=0)
    assert Photo.objects.get(pk=first.pk).sha256 == hashed
    assert Photo.objects.get(pk=gone.pk).sha256 == ""
    again = upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    assert "obama.jpg: This photo is already among this double&#x27;s photos." in again.content.decode()
    assert Photo.objects.count() == 2


def test_an_upload_without_htmx_redirects_so_a_reload_sends_nothing_again(owner_client, persona, consented):
    response = upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), follow=False)
    assert response.status_code == 302 and response["Location"] == reverse("persona", args=[persona.id])


@pytest.mark.parametrize("htmx", [True, False])
def test_photos_of_a_double_being_built_are_refused_on_its_whole_page(owner_client, persona, consented, htmx):
    """A build started in another tab: the panel acted on is stale, so the page comes back whole."""
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    photo = Photo.objects.get()
    persona.status = persona.Status.QUEUED
    persona.save()
    headers = {"HX-Request": "true"} if htmx else {}
    for send in (
        lambda: upload(owner_client, persona, ("obama2.jpg", face("obama2.jpg")), htmx=htmx, follow=False),
        lambda: owner_client.post(reverse("photo_delete", args=[photo.id]), headers=headers),
        lambda: owner_client.post(reverse("refused_photos_delete", args=[persona.id]), headers=headers),
    ):
        response = send()
        page = reverse("persona", args=[persona.id])
        assert response.headers.get("HX-Redirect" if htmx else "Location") == page
        shown = owner_client.get(page).content.decode()
        assert "The photos of this double cannot change while it is being built" in shown
    assert list(Photo.objects.all()) == [photo]


def test_the_page_tells_the_browser_how_many_files_it_may_send(owner_client, persona, consented):
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    page = owner_client.get(reverse("persona", args=[persona.id])).content.decode()
    assert 'data-room="19"' in page
    assert 'data-too-many="You can add 19 more photos to this double. Please choose fewer."' in page


@pytest.mark.parametrize(("language", "words"), [("en", "We could not read that request"), ("zh-CN", "我们无法读取这个请求")])
def test_more_files_than_django_reads_get_a_readable_400_and_store_nothing(
    owner_client, persona, consented, language, words
):
    count = settings.DATA_UPLOAD_MAX_NUMBER_FILES + 1
    payload = [SimpleUploadedFile(f"{i}.jpg", b"x") for i in range(count)]
    response = owner_client.post(
        reverse("photo_upload", args=[persona.id]), {"photos": payload}, headers={"accept-language": language}
    )
    assert response.status_code == 400
    assert words in response.content.decode()
    assert not Photo.objects.exists() and stored_files() == []


def test_a_missing_page_is_a_readable_404(owner_client):
    response = owner_client.get("/no-such-page/", headers={"accept-language": "zh-CN"})
    assert response.status_code == 404 and "找不到页面" in response.content.decode()


def test_twenty_one_files_in_one_request_are_refused(owner_client, persona, consented):
    response = upload(owner_client, persona, *[(f"{i}.jpg", face("obama_small.jpg")) for i in range(21)])
    assert response.status_code == 400
    assert "You can add 20 more photos to this double; you sent 21." in response.content.decode()
    assert not Photo.objects.exists() and stored_files() == []


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rgba.png", lambda: face("lin-manuel-miranda.png")),
        ("cmyk.jpg", lambda: encoded(Image.open(FACES / "obama.jpg").convert("CMYK"), "JPEG")),
        ("deep.png", lambda: encoded(Image.open(FACES / "obama.jpg").convert("L").point(lambda v: v * 256, "I").convert("I;16"), "PNG")),
        ("zip_appended.jpg", lambda: face("obama.jpg") + b"PK\x03\x04" + b"secret archive" * 100),
    ],
)
def test_unusual_but_valid_images_are_accepted_and_converted(owner_client, persona, consented, name, make):
    response = upload(owner_client, persona, (name, make()))
    assert response.status_code == 200
    photo = Photo.objects.get()
    data = photo.image.read()
    assert b"PK\x03\x04" not in data
    stored = Image.open(io.BytesIO(data))
    assert (stored.format, stored.mode) == ("JPEG", "RGB")
    grey = stored.convert("L")
    assert 30 < sum(grey.get_flattened_data()) / (grey.width * grey.height) < 225  # not washed out or black


def test_stored_photos_carry_no_metadata_and_are_upright(owner_client, persona, consented):
    original = Image.open(FACES / "obama.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    upload(owner_client, persona, ("gps.jpg", encoded(original, "JPEG", exif=exif, comment=b"private note")))
    stored = Image.open(Photo.objects.get().image)
    assert dict(stored.getexif()) == {}
    assert not {"exif", "icc_profile", "xmp", "comment"} & set(stored.info)
    assert stored.size == (original.height, original.width)


def test_no_consent_no_storage(owner_client, persona):
    response = upload(owner_client, persona, ("a.jpg", face("obama.jpg")))
    assert response.status_code == 400
    assert not Photo.objects.exists() and stored_files() == []


def test_consent_is_recorded_with_version(owner_client, owner, persona):
    response = owner_client.post(reverse("face_consent", args=[persona.id]), {})
    assert response.status_code == 400
    assert "Please tick the box to agree" in response.content.decode()
    owner_client.post(reverse("face_consent", args=[persona.id]), {"agree": "on"})
    consent = FaceConsent.objects.get(owner=owner)
    assert consent.version == FaceConsent.CURRENT_VERSION and consent.created is not None


def test_other_person_and_anonymous_cannot_upload(other_client, persona, owner):
    services.give_face_consent(owner)
    assert upload(other_client, persona, ("a.jpg", face("obama.jpg"))).status_code == 404
    assert upload(Client(), persona, ("a.jpg", face("obama.jpg")), follow=False).status_code == 302
    assert not Photo.objects.exists()


def test_real_faces_are_analysed_and_explained(owner_client, persona, consented):
    files = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama1.jpg", "biden.jpg", "two_people.jpg"]
    response = upload(owner_client, persona, *[(name, face(name)) for name in files], htmx=True)
    body = response.content.decode()
    photos = list(persona.photos.order_by("id"))
    verdicts = [(photo.status, photo.reason_code) for photo in photos]
    assert verdicts[:4] == [("accepted", "")] * 4
    assert verdicts[4:] == [("rejected", "different_person"), ("rejected", "multiple_faces")]
    assert sum(photo.analysis["reference"] for photo in photos[:4]) == 1
    assert "4 good photos." in body and "Add 1 more to build your double." in body
    assert "This face does not look like the person in your other photos." in body
    # Each card names its file: with twenty photos, the refused one is found by its name.
    assert [photo.original_name for photo in photos] == files
    assert '<span class="file-name" title="biden.jpg">biden.jpg</span>' in body
    # Scores only beside accepted photos: a refused one's "likeness 0.83" read as nearly a match.
    assert body.count("likeness") == 4
    persona.refresh_from_db()
    assert persona.preprocessed.name.endswith(".zip")

    chinese = owner_client.get(reverse("persona", args=[persona.id]), headers={"accept-language": "zh-CN"})
    assert "这张照片里不止一张脸" in chinese.content.decode()


def test_deleting_a_photo_removes_its_file_and_reanalyses(
    owner_client, other_client, persona, consented, django_capture_on_commit_callbacks
):
    upload(owner_client, persona, ("a.jpg", face("obama.jpg")), ("b.jpg", face("biden.jpg")))
    photo = persona.photos.get(reason_code="")
    assert other_client.post(reverse("photo_delete", args=[photo.id])).status_code == 404
    name, thumbnail = photo.image.name, photo.thumbnail.name
    with django_capture_on_commit_callbacks(execute=True):
        owner_client.post(reverse("photo_delete", args=[photo.id]))
    assert not Photo.objects.filter(id=photo.id).exists()
    assert not (Path(settings.MEDIA_ROOT) / name).exists()
    assert not (Path(settings.MEDIA_ROOT) / thumbnail).exists()


def test_refused_photos_are_deleted_at_once_to_make_room(
    owner_client, persona, consented, django_capture_on_commit_callbacks
):
    files = ["obama.jpg", "obama2.jpg", "biden.jpg", "two_people.jpg"]
    upload(owner_client, persona, *[(name, face(name)) for name in files])
    page = owner_client.get(reverse("persona", args=[persona.id])).content.decode()
    assert "Delete the 2 refused photos" in page and 'data-room="16"' in page
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(reverse("refused_photos_delete", args=[persona.id]), headers={"HX-Request": "true"})
    assert response.status_code == 200
    panel = response.content.decode()
    assert 'data-room="18"' in panel and "refused photo" not in panel and "2 good photos." in panel
    kept = list(persona.photos.all())
    assert [photo.original_name for photo in kept] == ["obama.jpg", "obama2.jpg"]
    photo_files = sorted(path.name for path in stored_files() if path.parent.name == "photos")
    assert photo_files == sorted(Path(name).name for photo in kept for name in (photo.image.name, photo.thumbnail.name))


def test_only_the_owner_deletes_refused_photos(owner_client, other_client, persona, consented):
    upload(owner_client, persona, ("two_people.jpg", face("two_people.jpg")))
    url = reverse("refused_photos_delete", args=[persona.id])
    assert other_client.post(url).status_code == 404
    anonymous = Client().post(url)
    assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith(reverse("login"))
    assert persona.photos.get().status == Photo.Status.REJECTED
    assert owner_client.get(url).status_code == 405


def test_photo_pages_show_small_thumbnails_to_the_owner_only(owner_client, other_client, persona, consented):
    response = upload(owner_client, persona, ("a.jpg", face("obama3.jpg")), htmx=True)
    photo = Photo.objects.get()
    thumbnail = Image.open(photo.thumbnail).convert("RGB")
    assert max(thumbnail.size) == services.THUMBNAIL_PX < max(Image.open(photo.image).size)
    # A square around the face: the card's centred square of this tall photo showed no head.
    assert thumbnail.size == (services.THUMBNAIL_PX, services.THUMBNAIL_PX)
    (found,) = services.face_analyzer().analyze(thumbnail)
    assert 0.3 < (found.box[1] + found.box[3]) / 2 / thumbnail.height < 0.5
    url = reverse("media_file", args=[photo.thumbnail.name])
    assert f'src="{url}"' in response.content.decode()
    assert reverse("media_file", args=[photo.image.name]) not in response.content.decode()
    assert owner_client.get(url).status_code == 200
    assert other_client.get(url).status_code == 404
    assert Client().get(url).status_code == 404


def test_an_analysis_beside_another_leaves_one_thumbnail_per_photo(owner_client, persona, consented, monkeypatch):
    """Two analyses of one double (two tabs): the second to store a new photo's thumbnail drops its own."""
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    photo = Photo.objects.get()
    photo.thumbnail.delete()  # as new to both analyses
    real_thumbnail, others = services.thumbnail_jpeg, []

    def other_analysis_stores_first(*args, **kwargs):
        other = Photo.objects.get(pk=photo.pk)
        other.thumbnail.save("other.jpg", ContentFile(real_thumbnail(*args, **kwargs)))
        others.append(other.thumbnail.name)
        return real_thumbnail(*args, **kwargs)

    monkeypatch.setattr(services, "thumbnail_jpeg", other_analysis_stores_first)
    services.analyse_persona(persona)
    photo.refresh_from_db()
    assert photo.thumbnail.name == others[0]
    photos_folder = [path.name for path in stored_files() if path.parent.name == "photos"]
    assert sorted(photos_folder) == sorted([Path(photo.image.name).name, Path(others[0]).name])


@pytest.mark.parametrize(
    ("name", "act", "zips_left"),
    [("obama.jpg", services.analyse_persona, 1), ("two_people.jpg", services.delete_refused_photos, 0)],
)
def test_a_stale_double_leaves_only_the_stored_preprocessed_folder(
    owner_client, persona, consented, django_capture_on_commit_callbacks, name, act, zips_left
):
    """Another tab analysed the double since this one was read: analysing it again replaces, and
    deleting its last photo removes, the stored zip, which the stale double never saw."""
    upload(owner_client, persona, (name, face(name)))
    stale = Persona.objects.get(pk=persona.pk)
    with django_capture_on_commit_callbacks(execute=True):
        services.analyse_persona(Persona.objects.get(pk=persona.pk))  # the other tab's analysis
        act(stale)
    persona.refresh_from_db()
    zips = [path.name for path in stored_files() if path.suffix == ".zip"]
    assert len(zips) == zips_left and zips == [Path(persona.preprocessed.name).name for _ in range(zips_left)]


def test_an_analysis_that_fails_to_store_leaves_no_new_file(owner_client, persona, consented, monkeypatch):
    """Its transaction rolls back: the zip and thumbnails it had written go too, the old zip stays."""
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    photo = persona.photos.get()
    photo.thumbnail.delete()  # new to the next analysis: it will write one
    before = stored_files()
    real_save = Persona.save

    def fail_storing_the_zip(self, *args, **kwargs):
        if kwargs.get("update_fields") == ["preprocessed"]:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Persona, "save", fail_storing_the_zip)
    with pytest.raises(OSError):
        services.analyse_persona(Persona.objects.get(pk=persona.pk))
    assert stored_files() == before


def test_more_photos_or_fewer_analyse_only_new_ones(owner_client, persona, consented, monkeypatch):
    """What the face checks found is kept per photo: the next upload or delete reuses it."""
    analyzer, analysed = services.face_analyzer(), []
    real_analyze = analyzer.analyze
    monkeypatch.setattr(analyzer, "analyze", lambda image: analysed.append(image.size) or real_analyze(image))
    upload(owner_client, persona, *[(name, face(name)) for name in ("obama.jpg", "obama1.jpg", "biden.jpg")])
    assert len(analysed) == 3
    upload(owner_client, persona, ("more.jpg", face("obama3.jpg")))
    assert len(analysed) == 4
    verdicts = sorted(persona.photos.values_list("status", "reason_code"))
    assert verdicts == [("accepted", "")] * 3 + [("rejected", "different_person")]
    owner_client.post(reverse("photo_delete", args=[persona.photos.filter(status="accepted").first().id]))
    assert len(analysed) == 4
    assert persona.photos.filter(status="accepted").count() == 2
    damaged = persona.photos.filter(status="accepted").first()  # say, edited by hand in the admin
    damaged.analysis = {**damaged.analysis, "check": {"key": "dlib/v1"}}
    damaged.save()
    upload(owner_client, persona, ("last.jpg", face("obama2.jpg")))
    assert len(analysed) == 6  # the new photo, and the damaged one again
    assert persona.photos.filter(status="accepted").count() == 3


def stored_cuts(persona) -> dict[str, Image.Image]:
    """The training images in the persona's stored folder, by photo id."""
    persona.refresh_from_db()
    with persona.preprocessed.open("rb") as stored, zipfile.ZipFile(stored) as archive:
        record = json.loads(archive.read("persona.json"))
        return {item["name"]: Image.open(archive.open(item["image"])).convert("RGB") for item in record["train"]}


def rewrite_stored_folder(persona, change) -> None:
    """Rewrites the stored zip with change(name, data) applied to each member."""
    persona.refresh_from_db()
    path = Path(persona.preprocessed.path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, change(name, data))


def test_the_next_analysis_keeps_the_cut_outs_of_photos_it_knows(owner_client, persona, consented):
    upload(owner_client, persona, *[(name, face(name)) for name in ("obama.jpg", "obama1.jpg")])
    cuts = stored_cuts(persona)
    kept = next(iter(cuts))
    record = json.loads(zipfile.ZipFile(persona.preprocessed.path).read("persona.json"))
    kept_file = next(item["image"] for item in record["train"] if item["name"] == kept)
    marker = encoded(Image.new("RGB", cuts[kept].size, (12, 200, 40)), "PNG")  # no segmenter draws this
    rewrite_stored_folder(persona, lambda name, data: marker if name == kept_file else data)

    upload(owner_client, persona, ("more.jpg", face("obama3.jpg")))
    again = stored_cuts(persona)
    assert len(again) == 3
    assert np.asarray(again[kept]).reshape(-1, 3).tolist().count([12, 200, 40]) == 512 * 512
    (new,) = set(again) - set(cuts)
    assert np.asarray(again[new])[0, 0].tolist() == [255, 255, 255]  # cut for the first time, onto white


def test_cut_outs_of_another_segmenter_or_version_are_cut_again(owner_client, persona, consented):
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    (kept,) = stored_cuts(persona)
    marker = encoded(Image.new("RGB", (512, 512), (12, 200, 40)), "PNG")

    def older(name, data):
        if name == "persona.json":
            return json.dumps({**json.loads(data), "cut_key": "pipeline.preprocess.grabcut_onto_white/v0"})
        return marker if name.startswith("train/") and name.endswith(".png") else data

    rewrite_stored_folder(persona, older)
    upload(owner_client, persona, ("more.jpg", face("obama3.jpg")))
    assert np.asarray(stored_cuts(persona)[kept])[0, 0].tolist() == [255, 255, 255]  # cut again, onto white


def test_unreadable_stored_cut_outs_are_cut_again(owner_client, persona, consented, caplog):
    upload(owner_client, persona, ("obama.jpg", face("obama.jpg")))
    rewrite_stored_folder(persona, lambda name, data: b"not json" if name == "persona.json" else data)
    with caplog.at_level(logging.WARNING, logger="studio.services"):
        upload(owner_client, persona, ("more.jpg", face("obama3.jpg")))
    assert "unreadable; cutting them again" in caplog.text
    assert len(stored_cuts(persona)) == 2


# --- Every upload handled: odd files, names, mixed batches, bursts --------------------------

def refusal_line(name: str, message: str) -> str:
    """How the photo panel lists a refused file."""
    return f"<li><strong>{name}</strong>: {message}</li>"


ODD_BUT_GOOD = {
    "bad_exif_jpeg": ("camera.jpg", lambda: jpeg_with_bad_exif(face_image("obama.jpg"))),
    "bad_exif_png": ("editor.png", lambda: png_with_bad_exif(face_image("obama.jpg"))),
    "junk_raw_profile_png": ("magick.png", lambda: png_with_junk_raw_profile(face_image("obama.jpg"))),
    "mpo": ("dual-lens.jpg", lambda: mpo(face_image("obama.jpg"), face_image("obama2.jpg"))),
    "progressive": ("progressive.jpg", lambda: encoded(face_image("obama.jpg"), "JPEG", progressive=True)),
}


@pytest.mark.parametrize("kind", ODD_BUT_GOOD)
def test_photos_with_odd_metadata_or_several_pictures_are_accepted(owner_client, persona, consented, kind):
    """Metadata is advisory: unreadable EXIF is ignored, the pixels kept; an MPO gives its first picture."""
    name, make = ODD_BUT_GOOD[kind]
    response = upload(owner_client, persona, (name, make()), htmx=True)
    assert response.status_code == 200
    stored = Photo.objects.get()
    assert (stored.original_name, stored.status) == (name, "accepted")
    image = Image.open(stored.image)
    assert image.size == (910, 1137)  # obama.jpg's, not turned; not obama2.jpg's 626 x 1200
    assert dict(image.getexif()) == {} and not {"exif", "icc_profile", "xmp", "comment"} & set(image.info)


TOO_SMALL = "This image is only {} pixels. Please send a photo at least 64 pixels on each side."
TOO_NARROW = ("This image is {} pixels: too long and narrow for a portrait. "
              "Please send a photo at most 8 times as long as it is wide.")
SLIVERS = {
    "8000x2": ((8000, 2), TOO_SMALL.format("8000 × 2")),
    "1x40000000": ((1, 40_000_000), TOO_SMALL.format("1 × 40000000")),
    "63x400": ((63, 400), TOO_SMALL.format("63 × 400")),
    "900x100": ((900, 100), TOO_NARROW.format("900 × 100")),
}
TOO_MANY_SCANS = ("This JPEG is saved in too many passes (progressive scans) to be opened quickly. "
                  "Please save it again as an ordinary JPEG, or send another photo.")


@pytest.mark.parametrize("kind", SLIVERS)
def test_slivers_are_refused_by_name_before_analysis(owner_client, persona, consented, monkeypatch, kind):
    size, message = SLIVERS[kind]
    analysed = []
    monkeypatch.setattr(services.face_analyzer(), "analyze", lambda image: analysed.append(image.size) or [])
    response = upload(owner_client, persona, ("sliver.png", encoded(Image.new("L", size), "PNG")), htmx=True)
    assert refusal_line("sliver.png", message) in response.content.decode()
    assert analysed == [] and not Photo.objects.exists() and stored_files() == []


def test_a_scan_bomb_is_refused_within_a_cpu_budget(owner_client, persona, consented):
    """A 3000 x 3000 progressive JPEG of 2,000 scans: about 18 s of CPU to decode, refused unread."""
    bomb = scan_bomb((3000, 3000), 2000)
    started = time.process_time()
    response = upload(owner_client, persona, ("bomb.jpg", bomb), htmx=True)
    assert time.process_time() - started < 5
    assert refusal_line("bomb.jpg", TOO_MANY_SCANS) in response.content.decode()
    assert not Photo.objects.exists() and stored_files() == []


def test_one_bad_file_never_costs_another(
    owner_client, persona, consented, monkeypatch, django_capture_on_commit_callbacks
):
    """Every file of a batch gets its own verdict: bad ones are refused by name, alone, and a photo
    whose analysis fails leaves no row or file; the good ones are kept and analysed."""
    analyzer = services.face_analyzer()
    real_analyze, breaking = analyzer.analyze, face_image("obama3.jpg").size

    def analyze(image):
        if image.size == breaking:
            raise RuntimeError("the face detector crashed")
        return real_analyze(image)

    monkeypatch.setattr(analyzer, "analyze", analyze)
    batch = [
        ("obama.jpg", face("obama.jpg")),
        ("sliver.png", encoded(Image.new("L", (8000, 2)), "PNG")),
        ("camera.jpg", jpeg_with_bad_exif(face_image("obama1.jpg"))),
        ("bomb.jpg", scan_bomb((3000, 3000), 2000)),
        ("cut.jpg", face("obama2.jpg")[:40_000]),
        ("breaks-analysis.jpg", face("obama3.jpg")),
        ("obama2.jpg", face("obama2.jpg")),
    ]
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(owner_client, persona, *batch, htmx=True)
    assert response.status_code == 200
    body = response.content.decode()
    for name, message in [
        ("sliver.png", SLIVERS["8000x2"][1]),
        ("bomb.jpg", TOO_MANY_SCANS),
        ("cut.jpg", "This file is not a photo we can read, or it is damaged."),
        ("breaks-analysis.jpg", "We could not analyse this photo. Please try another one."),
    ]:
        assert refusal_line(name, message) in body
    kept = list(persona.photos.order_by("id"))
    assert [(p.original_name, p.status) for p in kept] == [
        ("obama.jpg", "accepted"), ("camera.jpg", "accepted"), ("obama2.jpg", "accepted")
    ]
    assert "3 good photos." in body
    photo_files = sorted(path.name for path in stored_files() if path.parent.name == "photos")
    assert photo_files == sorted(Path(name).name for p in kept for name in (p.image.name, p.thumbnail.name))


def test_a_decoder_error_nobody_foresaw_refuses_that_file_alone(owner_client, persona, consented, monkeypatch):
    real_load_photo = uploads.load_photo

    def load_photo(image):
        if image.size == (320, 240):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real_load_photo(image)

    monkeypatch.setattr(uploads, "load_photo", load_photo)
    batch = [("odd.jpg", face("obama_small.jpg")), ("obama.jpg", face("obama.jpg"))]
    response = upload(owner_client, persona, *batch, htmx=True)
    unreadable = "This file is not a photo we can read, or it is damaged."
    assert refusal_line("odd.jpg", unreadable) in response.content.decode()
    assert list(persona.photos.values_list("original_name", "status")) == [("obama.jpg", "accepted")]


def test_a_request_that_fails_midway_leaves_no_photo_being_checked(
    owner_client, persona, consented, monkeypatch, django_capture_on_commit_callbacks
):
    """The rows a failed request stored go with it (here the second insert finds the database locked)."""
    real_save, inserts = Photo.save, []

    def locked_on_the_second_insert(self, *args, **kwargs):
        if self.pk is None:
            inserts.append(self)
            if len(inserts) == 2:
                raise OperationalError("database is locked")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Photo, "save", locked_on_the_second_insert)
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(OperationalError):
        upload(owner_client, persona, ("obama.jpg", face("obama.jpg")), ("obama2.jpg", face("obama2.jpg")))
    assert not Photo.objects.exists() and stored_files() == []


def test_file_names_are_display_text_cleaned_and_cut(owner_client, persona, consented):
    """upload.js sends each file under a short safe name, and its own name in `names`."""
    long_name, odd_name = "照" * 500 + ".jpg", "\x00\u202eevil\x1b[0m.jpg"
    files = [("photo-1.jpg", face("obama.jpg")), ("photo-2.jpg", face("obama2.jpg")), ("photo-3.jpg", b"")]
    response = owner_client.post(
        reverse("photo_upload", args=[persona.id]),
        {"photos": [SimpleUploadedFile(name, data) for name, data in files], "names": [long_name, odd_name, long_name]},
        headers={"HX-Request": "true"},
    )
    shown = "照" * 79 + "…" + "照" * 16 + ".jpg"  # 100 characters, the extension kept
    assert list(persona.photos.order_by("id").values_list("original_name", flat=True)) == [shown, "evil[0m.jpg"]
    assert refusal_line(shown, "This file is empty.") in response.content.decode()


def test_raw_long_file_names_never_break_a_request(owner_client, persona, consented):
    """Without upload.js, names come raw: past Django's 1 KB for a part's headers its parser
    refuses the request (a readable 400, nothing stored); a shorter one is shown cut to 100."""
    raw = io.BytesIO(face("obama.jpg"))
    raw.name = "照" * 500 + ".jpg"  # not an UploadedFile, which would cut it to 255 characters
    response = owner_client.post(reverse("photo_upload", args=[persona.id]), {"photos": [raw]})
    assert response.status_code == 400 and "We could not read that request" in response.content.decode()
    assert not Photo.objects.exists()
    upload(owner_client, persona, ("照" * 300 + ".jpg", face("obama.jpg")))
    assert len(Photo.objects.get().original_name) == 100


@pytest.mark.django_db(transaction=True)
def test_sqlite_writers_wait_for_each_other_instead_of_failing(owner, tmp_path):
    """Two uploads that read, then write, at once: with deferred transactions one of them failed
    with "database is locked" (SQLite does not wait to upgrade a read lock); with IMMEDIATE ones
    the second waits at BEGIN, within the busy timeout. SQLite is the default database, so on a
    suite run on PostgreSQL this test runs itself again, on SQLite, in a child pytest."""
    if connection.vendor != "sqlite":
        env = {name: value for name, value in os.environ.items() if name != "DATABASE_URL"}
        test = f"{Path(__file__).relative_to(ROOT)}::test_sqlite_writers_wait_for_each_other_instead_of_failing"
        child = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            cwd=ROOT, env={**env, "DATA_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=300,
        )
        assert child.returncode == 0 and "1 passed" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]
        return
    assert connection.cursor().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    both_have_read = threading.Barrier(2, timeout=1)
    errors: list[Exception] = []

    def read_then_write(name: str) -> None:
        try:
            with transaction.atomic():
                Persona.objects.filter(owner=owner).count()
                try:
                    both_have_read.wait()
                except threading.BrokenBarrierError:
                    pass  # IMMEDIATE: the other one is waiting for this one's write lock
                Persona.objects.create(owner=owner, name=name)
        except Exception as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=read_then_write, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and Persona.objects.filter(owner=owner).count() == 2
