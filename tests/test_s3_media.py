"""Media on an S3-compatible store (moto's server, a real HTTP S3 endpoint): objects are private,
and deleting a double or all of a person's data leaves no object of theirs in the bucket."""

from __future__ import annotations

import runpy
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from django.urls import reverse

import photobooth.settings
from photobooth.dev import free_port
from studio import jobs, services
from studio.models import owner_folder
from tests.jobs_fixtures import demo_templates, persona_with_photos, ready_persona

pytestmark = pytest.mark.django_db(transaction=True)  # files go after commit (studio.signals)

BUCKET = "photobooth-media"
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server in its own process, on a free port."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    yield url
    server.kill()
    server.wait()


@pytest.fixture
def bucket(s3_endpoint, settings, monkeypatch):
    """An empty bucket, and the site's default storage on it, configured exactly as
    photobooth/settings.py configures it from the README's S3_* variables."""
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    s3.create_bucket(Bucket=BUCKET)
    variables = {
        "S3_BUCKET": BUCKET, "S3_ENDPOINT_URL": s3_endpoint, "S3_REGION": "us-east-1",
        "S3_ACCESS_KEY_ID": "test", "S3_SECRET_ACCESS_KEY": "test",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    production = runpy.run_path(str(Path(photobooth.settings.__file__)))
    assert production["STORAGES"]["default"]["BACKEND"] == "storages.backends.s3.S3Storage"
    settings.STORAGES = {**settings.STORAGES, "default": production["STORAGES"]["default"]}
    yield s3
    for key in keys(s3):
        s3.delete_object(Bucket=BUCKET, Key=key)
    s3.delete_bucket(Bucket=BUCKET)


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def ready_with_portraits(owner, name: str):
    """A built double with one portrait: photos, crops, reference face and portrait files stored."""
    persona = ready_persona(owner, name)
    job = services.request_portraits(persona, demo_templates(owner, 1))
    jobs.make_portraits(job.id)
    job.refresh_from_db()
    assert job.status == "succeeded", job.error_detail
    return persona


def stored_names(persona) -> set[str]:
    names = {persona.preprocessed.name, persona.reference_face.name, persona.best_face.name, persona.lora_file.name}
    for photo in persona.photos.all():
        names |= {photo.image.name, photo.thumbnail.name}
    for portrait in persona.portraits.all():
        names |= {portrait.image.name, portrait.thumbnail.name}
    return {name for name in names if name}


def assert_private(s3, s3_endpoint: str, stored: list[str]) -> None:
    """No anonymous read of any object, and no grant to everyone."""
    for key in stored:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{s3_endpoint}/{BUCKET}/{key}", timeout=5)
        assert refused.value.code == 403, key
        grantees = {grant["Grantee"].get("URI") for grant in s3.get_object_acl(Bucket=BUCKET, Key=key)["Grants"]}
        assert ALL_USERS not in grantees, key


def test_objects_are_private_and_served_only_through_the_owner_checked_view(
    bucket, s3_endpoint, owner, owner_client, other_client
):
    """A person's face photos in the bucket: no anonymous read, no public grant; the site hands
    them to their owner alone."""
    folder = owner_folder(owner.pk) + "/"
    persona = persona_with_photos(owner)
    selfies = keys(bucket, folder)
    assert any("/photos/" in key for key in selfies), selfies
    assert_private(bucket, s3_endpoint, selfies)
    page = owner_client.get(reverse("persona", args=[persona.id])).content.decode()
    assert s3_endpoint not in page and f"/media/{folder}photos/" in page  # the owner-checked view

    jobs.build_double(services.request_training(persona).id)
    persona.refresh_from_db()
    jobs.make_portraits(services.request_portraits(persona, demo_templates(owner, 1)).id)
    made = keys(bucket, folder)
    assert any("/portraits/" in key for key in made), made
    assert_private(bucket, s3_endpoint, made)
    page = owner_client.get(reverse("album")).content.decode()
    assert s3_endpoint not in page and f"/media/{folder}portraits/" in page

    for key in made:
        response = owner_client.get(reverse("media_file", args=[key]))
        served = b"".join(response.streaming_content)
        assert response.status_code == 200 and served == bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert other_client.get(reverse("media_file", args=[key])).status_code == 404, key


def test_deleting_a_double_removes_its_objects_and_only_them(bucket, owner, owner_client):
    kept = ready_persona(owner, "Kept")
    deleted = ready_with_portraits(owner, "Deleted")
    kept_names, deleted_names = stored_names(kept), stored_names(deleted)
    assert deleted_names <= set(keys(bucket)) and kept_names <= set(keys(bucket))

    response = owner_client.post(reverse("persona_delete", args=[deleted.id]), {"confirm": "on"})
    assert response.status_code == 302

    left = set(keys(bucket, owner_folder(owner.pk) + "/"))
    assert not deleted_names & left, deleted_names & left
    # Nothing of the owner's but the kept double's files (no orphan crop, zip or thumbnail).
    assert left == kept_names, left - kept_names


@pytest.mark.parametrize("delete_account", [False, True])
def test_delete_my_data_leaves_no_object_of_the_person(bucket, owner, owner_client, other_user, delete_account):
    ready_with_portraits(owner, "Me")
    others = stored_names(ready_persona(other_user, "Theirs"))
    folder = owner_folder(owner.pk) + "/"
    assert keys(bucket, folder)

    form = {"confirm": "on", "delete_account": "on"} if delete_account else {"confirm": "on"}
    response = owner_client.post(reverse("delete_data"), form)
    assert response.status_code == 302

    assert keys(bucket, folder) == []
    assert set(keys(bucket, "users/")) == others  # the other person's objects stay, and nothing else
