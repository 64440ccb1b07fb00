"""Creates the demo staff account that `make run` prints, on development sites only."""

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "photobooth-demo"


class Command(BaseCommand):
    help = "Create (or reset) the demo staff account. Refused when DEBUG is off."

    def handle(self, *args, **options) -> None:
        if not settings.DEBUG:
            raise CommandError("seed_demo only runs on a development site (DEBUG=1): it sets a known password.")
        user, _created = User.objects.get_or_create(username=DEMO_USERNAME, defaults={"email": "demo@localhost"})
        user.is_staff = True
        user.is_superuser = True
        user.set_password(DEMO_PASSWORD)
        user.save()
        self.stdout.write(f"Demo staff login: {DEMO_USERNAME} / {DEMO_PASSWORD}")
