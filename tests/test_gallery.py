"""Template gallery: staff upload (page and admin), face check, tag filter, asking for portraits."""

from __future__ import annotations

import io
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from PIL import Image

from studio import services
from studio.models import Job, Persona, Template
from tests.jobs_fixtures import FACES, demo_templates

pytestmark = pytest.mark.django_db


def template_post(image: bytes, **fields) -> dict:
    return {"title": "Studio", "tags": "formal, studio", "prompt": "", "negative_prompt": "", "published": "on",
            "image": SimpleUploadedFile("t.jpg", image), **fields}


def test_staff_adds_a_template_with_a_face(staff_client):
    response = staff_client.post(reverse("template_new"), template_post((FACES / "biden.jpg").read_bytes()))
    assert response.status_code == 302
    template = Template.objects.get()
    assert (template.title, template.tags, template.uploaded_by.username) == ("Studio", "formal, studio", "staff")
    assert template.published and len(template.face_boxes) == 1
    assert template.thumbnail and max(Image.open(template.thumbnail).size) <= services.THUMBNAIL_PX


def test_a_tall_templates_card_is_cut_around_its_face(staff_client):
    """biden.jpg is 970 x 2204 with the face at the top: the card's centred cut showed a torso."""
    staff_client.post(reverse("template_new"), template_post((FACES / "biden.jpg").read_bytes()))
    thumbnail = Image.open(Template.objects.get().thumbnail).convert("RGB")
    assert thumbnail.size == (288, 384)  # the cards' 3:4
    (face,) = services.face_analyzer().analyze(thumbnail)
    x0, y0, x1, y1 = face.box
    assert 0.3 < (y0 + y1) / 2 / thumbnail.height < 0.5 and 0.3 < (x0 + x1) / 2 / thumbnail.width < 0.7


def test_template_without_a_face_is_refused_with_the_reason(staff_client):
    blank = io.BytesIO()
    Image.new("RGB", (600, 800), "skyblue").save(blank, "JPEG")
    response = staff_client.post(reverse("template_new"), template_post(blank.getvalue()))
    assert response.status_code == 400
    assert "We could not find a face in this template." in response.content.decode()
    assert not Template.objects.exists()


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [("notes.jpg", b"just some text", "这个文件不是我们能读取的照片，或者已经损坏。"), ("empty.jpg", b"", "这个文件是空的。")],
)
def test_a_template_that_is_no_image_is_refused_in_the_sites_words(staff_client, name, data, words):
    post = {**template_post(b""), "image": SimpleUploadedFile(name, data)}
    response = staff_client.post(reverse("template_new"), post, headers={"accept-language": "zh-CN"})
    assert response.status_code == 400 and not Template.objects.exists()
    assert words in response.content.decode() and "您" not in response.content.decode()


def test_admin_upload_checks_the_face_too(staff_client):
    blank = io.BytesIO()
    Image.new("RGB", (600, 800), "white").save(blank, "JPEG")
    response = staff_client.post(reverse("admin:studio_template_add"), template_post(blank.getvalue()))
    assert response.status_code == 200 and "We could not find a face" in response.content.decode()
    response = staff_client.post(reverse("admin:studio_template_add"), template_post((FACES / "obama.jpg").read_bytes()))
    assert response.status_code == 302 and Template.objects.get().face_boxes


@pytest.mark.parametrize("page", ["template_new", "admin:studio_template_add"])
def test_staff_are_told_when_a_template_shows_several_faces(staff_client, page):
    response = staff_client.post(reverse(page), template_post((FACES / "two_people.jpg").read_bytes()), follow=True)
    assert len(Template.objects.get().face_boxes) == 2
    assert "This template shows 2 faces. Portraits replace only the largest one" in response.content.decode()
    response = staff_client.post(reverse(page), template_post((FACES / "biden.jpg").read_bytes()), follow=True)
    assert "Portraits replace only the largest one" not in response.content.decode()


def test_only_staff_reach_the_upload_page(owner_client):
    refused = owner_client.get(reverse("template_new"))
    assert refused.status_code == 404
    assert "There is nothing here, or it is not yours to see." in refused.content.decode()
    signed_out = Client().get(reverse("template_new"))
    assert signed_out.status_code == 302
    assert signed_out["Location"] == f"{reverse('login')}?next={reverse('template_new')}"


def test_gallery_shows_published_templates_and_filters_by_tag(owner_client, owner):
    space, formal = demo_templates(owner, 2)
    space.tags, formal.tags = "space", "formal"
    space.save(), formal.save()
    Template.objects.create(title="Draft", published=False)
    body = owner_client.get(reverse("gallery")).content.decode()
    assert space.title in body and formal.title in body and "Draft" not in body
    filtered = owner_client.get(reverse("gallery"), {"tag": "space"}).content.decode()
    assert space.title in filtered and formal.title not in filtered


def test_asking_for_portraits_of_another_persons_double_is_404(other_client, owner):
    persona = Persona.objects.create(owner=owner, name="Mine", status=Persona.Status.READY)
    template = demo_templates(owner, 1)[0]
    response = other_client.post(reverse("portraits_request"), {"persona": persona.id, "templates": [template.id]})
    assert response.status_code == 404
    assert not Job.objects.exists()


def test_asking_for_portraits_without_a_template_explains(owner_client, owner, django_capture_on_commit_callbacks):
    Persona.objects.create(owner=owner, name="First", status=Persona.Status.READY)
    persona = Persona.objects.create(owner=owner, name="Mine", status=Persona.Status.READY)
    (template,) = demo_templates(owner, 1)
    response = owner_client.post(reverse("portraits_request"), {"persona": persona.id, "tag": "demo"}, follow=True)
    body = response.content.decode()
    assert "Pick at least one template." in body
    assert not Job.objects.exists()
    # The gallery as it was left: the same tag, the same double chosen.
    assert response.redirect_chain[-1][0] == f"{reverse('gallery')}?tag=demo&persona={persona.id}"
    assert f'<option value="{persona.id}" selected>Mine</option>' in body and template.title in body


def test_a_tag_that_matches_nothing_says_so(owner_client, owner):
    demo_templates(owner, 1)
    body = owner_client.get(reverse("gallery"), {"tag": "none"}).content.decode()
    assert "No templates with the tag “none”." in body and "No templates yet." not in body


def test_staff_see_their_drafts_marked_and_others_do_not(staff_client, owner_client, owner):
    response = staff_client.post(reverse("template_new"), template_post((FACES / "biden.jpg").read_bytes(), published=""),
                                 follow=True)
    body = response.content.decode()
    assert "Template “Studio” added as a draft: only staff see it until it is published." in body
    draft = Template.objects.get()
    assert f'<input type="checkbox" name="templates" value="{draft.id}" disabled>' in body
    assert "Draft: only staff see it until it is published" in body
    assert "Studio" not in owner_client.get(reverse("gallery")).content.decode()


def test_tag_filter_matches_whole_tags(owner_client, owner):
    (art,) = demo_templates(owner, 1)
    art.tags = "portrait, formal"
    art.save()
    assert art.title not in owner_client.get(reverse("gallery"), {"tag": "art"}).content.decode()
    assert art.title in owner_client.get(reverse("gallery"), {"tag": "Portrait"}).content.decode()


def test_a_tag_in_two_cases_is_one_link_and_marked_current_in_either(owner_client, owner):
    first, second = demo_templates(owner, 2)
    first.tags, second.tags = "formal, outdoor", "Formal"
    first.save(), second.save()
    for asked in ("formal", "FORMAL"):
        page = owner_client.get(reverse("gallery"), {"tag": asked}).content.decode()
        bar = page.split('<nav class="tags">')[1].split("</nav>")[0]
        links = re.findall(r'<a href="\?tag=(\w+)"( class="current")?>', bar)
        assert [(name.casefold(), bool(current)) for name, current in links] == [("formal", True), ("outdoor", False)]


def test_a_template_shows_its_chinese_title_on_chinese_pages(staff_client, owner_client):
    post = template_post((FACES / "biden.jpg").read_bytes(), title="Oval Office", title_zh_hans="椭圆形办公室")
    assert staff_client.post(reverse("template_new"), post).status_code == 302
    staff_client.post(reverse("template_new"), template_post((FACES / "obama.jpg").read_bytes(), title="Only English"))
    chinese = owner_client.get(reverse("gallery"), headers={"accept-language": "zh-CN"}).content.decode()
    assert "<span>椭圆形办公室</span>" in chinese and "Oval Office" not in chinese
    assert "<span>Only English</span>" in chinese  # no Chinese title given: the title
    english = owner_client.get(reverse("gallery"), headers={"accept-language": "en"}).content.decode()
    assert "<span>Oval Office</span>" in english and "椭圆形办公室" not in english


def test_unpublished_template_files_are_for_staff_only(owner_client, staff_client, owner):
    (draft,) = demo_templates(owner, 1)
    draft.published = False
    draft.save()
    for field in (draft.image, draft.thumbnail):
        assert owner_client.get(reverse("media_file", args=[field.name])).status_code == 404
        served = staff_client.get(reverse("media_file", args=[field.name]))
        assert served.status_code == 200
        with field.open("rb") as stored:
            assert b"".join(served.streaming_content) == stored.read()
