"""Downloads the production diffusion models into MODEL_DIR and verifies their hashes."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pipeline.models import fetch_models


class Command(BaseCommand):
    help = "Download the models of the manifest (pipeline/models.py) into MODEL_DIR; needs a network."

    def handle(self, *args, **options) -> None:
        settings.MODEL_DIR.mkdir(parents=True, exist_ok=True)
        try:
            statuses = fetch_models(settings.MODEL_DIR)
        except Exception as error:  # a network, disk or checksum failure: said in one line, not a traceback
            raise CommandError(f"Could not download the models: {type(error).__name__}: {error}") from error
        for status in statuses:
            self.stdout.write(f"{status.state:8} {status.name}" + (f": {status.detail}" if status.detail else ""))
        if not all(status.ready for status in statuses):
            raise CommandError("Some models could not be fetched or verified; see above.")
