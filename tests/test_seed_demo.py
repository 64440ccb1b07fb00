"""`manage.py seed_demo`: the demo staff account and the four demo templates, in both languages."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command

from studio.models import Template

pytestmark = pytest.mark.django_db


def test_seeds_the_demo_account_and_templates_once(settings):
    settings.DEBUG = True
    call_command("seed_demo")
    call_command("seed_demo")  # make run seeds on every start
    assert User.objects.get(username="demo").is_staff
    titles = sorted(Template.objects.values_list("title", "title_zh_hans"))
    assert titles == [("Astronaut", "宇航员"), ("Official portrait", "正式肖像"), ("Oval Office", "椭圆形办公室"),
                      ("State room", "国宴厅")]
    assert all(template.published and template.face_boxes for template in Template.objects.all())


def test_a_site_seeded_before_gets_the_new_titles_not_copies(settings):
    settings.DEBUG = True
    call_command("seed_demo")
    Template.objects.filter(title="Oval Office").update(title="Flag portrait", title_zh_hans="")
    call_command("seed_demo")
    assert Template.objects.count() == 4
    assert Template.objects.get(title="Oval Office").title_zh_hans == "椭圆形办公室"


def test_a_demo_template_staff_deleted_stays_deleted(settings):
    settings.DEBUG = True
    call_command("seed_demo")
    Template.objects.get(title="Astronaut").delete()
    call_command("seed_demo")  # the next `make run`
    assert not Template.objects.filter(title="Astronaut").exists() and Template.objects.count() == 3
    Template.objects.all().delete()
    call_command("seed_demo")
    assert not Template.objects.exists()


def test_is_refused_on_a_production_site(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="only runs on a development site"):
        call_command("seed_demo")
    assert not User.objects.filter(username="demo").exists()
