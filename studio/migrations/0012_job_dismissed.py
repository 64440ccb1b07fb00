"""A failed job stays in the person's jobs panel until they act on it: `dismissed_at` is when they
put it away without trying again."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("studio", "0011_portrait_held_out_similarity"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="dismissed_at",
            field=models.DateTimeField(blank=True, null=True, verbose_name="failure put away by the person"),
        ),
    ]
