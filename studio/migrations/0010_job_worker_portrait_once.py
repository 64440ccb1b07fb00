"""Jobs that survive faults: the worker running a job, how many workers it lost, and one portrait
per job and template.

A job re-run before this (a passing failure, a retry) may have stored a template twice: the oldest
portrait of each pair stays, the later copies and their files go, then the constraint is added."""

from django.core.files.storage import default_storage
from django.db import migrations, models, transaction
from django.db.models import Count, Min


def keep_the_first_portrait_of_each_template(apps, schema_editor):
    Portrait = apps.get_model("studio", "Portrait")
    repeated = (
        Portrait.objects.filter(job__isnull=False, template__isnull=False)
        .values("job", "template")
        .annotate(copies=Count("id"), first=Min("id"))
        .filter(copies__gt=1)
    )
    for pair in repeated:
        copies = Portrait.objects.filter(job=pair["job"], template=pair["template"]).exclude(pk=pair["first"])
        files = [name for row in copies.values_list("image", "thumbnail") for name in row if name]
        copies.delete()
        transaction.on_commit(lambda files=files: [default_storage.delete(name) for name in files])


class Migration(migrations.Migration):

    dependencies = [
        ("studio", "0009_job_templates_key"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="worker",
            field=models.CharField(blank=True, editable=False, max_length=100, verbose_name="worker"),
        ),
        migrations.AddField(
            model_name="job",
            name="lost_workers",
            field=models.PositiveSmallIntegerField(default=0, verbose_name="workers lost while running it"),
        ),
        migrations.RunPython(keep_the_first_portrait_of_each_template, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="portrait",
            constraint=models.UniqueConstraint(fields=("job", "template"), name="one_portrait_per_job_and_template"),
        ),
    ]
