"""One active job per request: Job.templates_key and the constraint that holds it.

Jobs waiting or running from before this have no key, and a person may have several with the
same templates (or, in a short window, two builds): each gets a key of its own (never a hash,
so no new request is taken for one of them), then the constraint is added."""

from django.db import migrations, models
from django.db.models import Value
from django.db.models.functions import Cast, Concat


def key_earlier_active_jobs(apps, schema_editor):
    Job = apps.get_model("studio", "Job")
    Job.objects.filter(status__in=["queued", "running"]).update(
        templates_key=Concat(Value("before-0009-job-"), Cast("pk", models.CharField()))
    )


class Migration(migrations.Migration):

    dependencies = [
        ("studio", "0008_template_title_zh_hans"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="templates_key",
            field=models.CharField(blank=True, editable=False, max_length=64, verbose_name="templates asked for"),
        ),
        migrations.RunPython(key_earlier_active_jobs, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="job",
            constraint=models.UniqueConstraint(
                condition=models.Q(("cancel_requested", False), ("status__in", ["queued", "running"])),
                fields=("persona", "kind", "templates_key"),
                name="one_active_job_per_request",
            ),
        ),
    ]
