"""Photos stored before 0005 have no SHA-256, so the same file sent again was not caught:
hash their stored (cleaned) image, as add_photos does for new ones."""

import hashlib

from django.db import migrations


def hash_stored_photos(apps, schema_editor):
    Photo = apps.get_model("studio", "Photo")
    for photo in Photo.objects.filter(sha256="").exclude(image="").iterator():
        try:
            with photo.image.open("rb") as stored:
                digest = hashlib.file_digest(stored, "sha256").hexdigest()
        except FileNotFoundError:  # its file went with the raw selfies: nothing to compare
            continue
        Photo.objects.filter(pk=photo.pk).update(sha256=digest)


class Migration(migrations.Migration):

    dependencies = [
        ("studio", "0005_photo_sha256"),
    ]

    operations = [
        migrations.RunPython(hash_stored_photos, migrations.RunPython.noop),
    ]
