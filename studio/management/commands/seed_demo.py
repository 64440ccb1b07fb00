"""Creates the demo staff account that `make run` prints and the demo templates, on development sites only."""

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from studio import services
from studio.models import Template

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "photobooth-demo"
# Titles demo templates had before (they did not match their pictures): renamed, not seeded again.
FORMER_TITLES = {"Oval Office": "Flag portrait", "State room": "At the podium"}
DEMO_TEMPLATES = {  # file: (title, title in Simplified Chinese, tags)
    "official-portrait-1.jpg": ("Official portrait", "正式肖像", "formal, studio"),
    "official-portrait-2.jpg": ("Oval Office", "椭圆形办公室", "formal, studio"),
    "podium.jpg": ("State room", "国宴厅", "event"),
    "astronaut.jpg": ("Astronaut", "宇航员", "space, costume"),
}


class Command(BaseCommand):
    help = (
        "Create (or reset) the demo staff account; seed the demo templates when it creates the account. "
        "Refused when DEBUG is off."
    )

    def handle(self, *args, **options) -> None:
        if not settings.DEBUG:
            raise CommandError("seed_demo only runs on a development site (DEBUG=1): it sets a known password.")
        user, created = User.objects.get_or_create(username=DEMO_USERNAME, defaults={"email": "demo@localhost"})
        user.is_staff = True
        user.is_superuser = True
        user.set_password(DEMO_PASSWORD)
        user.save()
        # The demo templates come with the demo account, on the first start: `make run` seeds on
        # every start, and a demo template that staff deleted must stay deleted. Earlier ones get
        # their new titles.
        for filename, (title, title_zh_hans, tags) in DEMO_TEMPLATES.items():
            seeded = Template.objects.filter(title__in=[title, FORMER_TITLES.get(title, title)])
            seeded.filter(title_zh_hans="").update(title=title, title_zh_hans=title_zh_hans)
            if created:
                jpeg = (services.DEMO_TEMPLATES / filename).read_bytes()
                services.create_template(title, tags, jpeg, uploaded_by=user, title_zh_hans=title_zh_hans)
                self.stdout.write(f"Demo template: {title}")
        self.stdout.write(f"Demo staff login: {DEMO_USERNAME} / {DEMO_PASSWORD}")
