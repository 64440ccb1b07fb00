"""Lists the diffusion models in MODEL_DIR: present, missing or corrupt, and how to fix each."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pipeline.models import check_models


class Command(BaseCommand):
    help = "Check the diffusion models in MODEL_DIR (exit status 1 when any is missing or corrupt)."

    def handle(self, *args, **options) -> None:
        statuses = check_models(settings.MODEL_DIR)
        for status in statuses:
            line = f"{status.state:8} {status.name} ({status.path})"
            self.stdout.write(line + (f": {status.detail}" if status.detail else ""))
        if not all(status.ready for status in statuses):
            raise CommandError(
                f"Some models in {settings.MODEL_DIR} are not ready; portraits use the classic engine until they are."
            )
        self.stdout.write(self.style.SUCCESS(f"All models in {settings.MODEL_DIR} are ready."))
