"""The admin for staff: people's files as names, not links only their owner may open; scores rounded;
jobs cancelled as the person would, never deleted from under a worker."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.messages.storage.fallback import FallbackStorage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from studio import services
from studio.admin import JobAdmin
from studio.models import Job, Persona, Photo, Portrait, Template

pytestmark = pytest.mark.django_db


@pytest.fixture
def persona(owner) -> Persona:
    persona = Persona.objects.create(owner=owner, name="Me", identity_score=0.9985783100128174)
    persona.lora_file.name = f"users/{owner.pk}/personas/lora.safetensors"
    persona.save()
    return persona


@pytest.mark.parametrize("model", ["persona", "photo", "portrait"])
def test_a_persons_files_show_as_names_not_links(staff_client, persona, model):
    photo = Photo.objects.create(persona=persona, image=f"users/{persona.owner_id}/photos/selfie.jpg")
    portrait = Portrait.objects.create(persona=persona, image=f"users/{persona.owner_id}/portraits/p.jpg",
                                       identity_similarity=0.71234)
    row = {"persona": persona, "photo": photo, "portrait": portrait}[model]
    page = staff_client.get(reverse(f"admin:studio_{model}_change", args=[row.pk])).content.decode()
    stored = {"persona": "lora.safetensors", "photo": "selfie.jpg", "portrait": "p.jpg"}[model]
    assert stored in page
    assert "/media/" not in page and 'type="file"' not in page


def test_scores_are_listed_to_two_places(staff_client, persona):
    Portrait.objects.create(persona=persona, image="users/1/portraits/p.jpg", identity_similarity=0.71234)
    personas = staff_client.get(reverse("admin:studio_persona_changelist")).content.decode()
    assert '<td class="field-identity">1.00</td>' in personas and "0.9985783100128174" not in personas
    portraits = staff_client.get(reverse("admin:studio_portrait_changelist")).content.decode()
    assert '<td class="field-identity">0.71</td>' in portraits and "0.71234" not in portraits


@pytest.mark.parametrize("model", ["persona", "photo", "portrait"])
def test_staff_cannot_add_a_persons_rows(staff_client, model):
    """Such a row would have no file: its owner's pages would fail on it."""
    assert staff_client.get(reverse(f"admin:studio_{model}_add")).status_code == 403
    assert staff_client.post(reverse(f"admin:studio_{model}_add"), {"name": "x"}).status_code == 403


def test_a_photo_stays_with_its_double(staff_client, persona, owner):
    photo = Photo.objects.create(persona=persona, image=f"users/{owner.pk}/photos/selfie.jpg")
    other = Persona.objects.create(owner=owner, name="Other")
    url = reverse("admin:studio_photo_change", args=[photo.pk])
    staff_client.post(url, {"persona": other.pk, "status": "accepted", "reason_code": "", "analysis": "{}",
                            "original_name": "selfie.jpg"})
    photo.refresh_from_db()
    assert photo.persona == persona and photo.status == "accepted"


@pytest.fixture
def build(persona) -> Job:
    """A double waiting for its build, as request_training leaves it."""
    persona.status = Persona.Status.QUEUED
    persona.save()
    return Job.objects.create(persona=persona, kind=Job.Kind.TRAIN)


def test_a_running_job_cannot_be_deleted(staff_client, build):
    Job.objects.filter(pk=build.pk).update(status=Job.Status.RUNNING)
    assert staff_client.get(reverse("admin:studio_job_delete", args=[build.pk])).status_code == 403
    assert staff_client.post(reverse("admin:studio_job_delete", args=[build.pk]), {"post": "yes"}).status_code == 403
    page = staff_client.get(reverse("admin:studio_job_change", args=[build.pk])).content.decode()
    assert reverse("admin:studio_job_delete", args=[build.pk]) not in page
    delete_the_double = reverse("admin:studio_persona_delete", args=[build.persona_id])
    refusal = staff_client.get(delete_the_double).content.decode()
    assert "permission to delete the following types of objects:" in refusal and "<li>job</li>" in refusal
    assert staff_client.post(delete_the_double, {"post": "yes"}).status_code == 403
    assert Job.objects.filter(pk=build.pk).exists()


def test_deleting_a_waiting_build_frees_its_double(staff_client, build, persona):
    """Deleted as a row alone, it left the double "Queued": not buildable again, photos fixed."""
    response = staff_client.post(reverse("admin:studio_job_delete", args=[build.pk]), {"post": "yes"})
    assert response.status_code == 302 and not Job.objects.filter(pk=build.pk).exists()
    persona.refresh_from_db()
    assert persona.status == Persona.Status.CANCELLED


def test_staff_cancel_jobs_as_the_person_would(staff_client, build, persona):
    running = Job.objects.create(persona=persona, kind=Job.Kind.GENERATE, status=Job.Status.RUNNING, templates_key="x")
    response = staff_client.post(
        reverse("admin:studio_job_changelist"),
        {"action": "cancel", "_selected_action": [build.pk, running.pk]},
        follow=True,
    )
    assert "1 waiting job cancelled." in response.content.decode()
    assert "1 running job stops at its next step." in response.content.decode()
    build.refresh_from_db()
    persona.refresh_from_db()
    assert (build.status, persona.status) == (Job.Status.CANCELLED, Persona.Status.CANCELLED)
    assert Job.objects.get(pk=running.pk).cancel_requested


def test_a_job_that_starts_while_staff_delete_it_is_stopped_not_deleted(staff_client, build, rf):
    """The admin checks each row's permission again when the deletion is confirmed; a worker may
    still take the job between that check and the delete."""
    Job.objects.filter(pk=build.pk).update(status=Job.Status.RUNNING)  # taken since the confirmation page
    confirmed = {"action": "delete_selected", "_selected_action": [build.pk], "post": "yes"}
    assert staff_client.post(reverse("admin:studio_job_changelist"), confirmed).status_code == 403
    request = rf.post("/admin/studio/job/")
    request.session = {}
    request._messages = FallbackStorage(request)
    JobAdmin(Job, admin.site).delete_queryset(request, Job.objects.filter(pk=build.pk))  # just after the check
    assert Job.objects.get(pk=build.pk).cancel_requested
    assert [str(m) for m in request._messages] == ["1 job had started, so it was not deleted: it stops at its next step."]


def test_a_template_cannot_be_deleted_while_a_job_waits_for_it(staff_client, persona, owner):
    template = Template.objects.create(title="Studio", image="templates/studio.jpg", published=True)
    job = Job.objects.create(persona=persona, kind=Job.Kind.GENERATE, templates_key="x")
    job.templates.set([template])
    delete = reverse("admin:studio_template_delete", args=[template.pk])
    assert staff_client.post(delete, {"post": "yes"}).status_code == 403
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED)
    assert staff_client.post(delete, {"post": "yes"}).status_code == 302
    assert not Template.objects.filter(pk=template.pk).exists()


def test_a_new_image_keeps_who_uploaded_the_template(staff_client, owner):
    jpeg = (services.DEMO_TEMPLATES / "astronaut.jpg").read_bytes()
    template = services.create_template("Astronaut", "space", jpeg, uploaded_by=owner)
    image = SimpleUploadedFile("new.jpg", (services.DEMO_TEMPLATES / "podium.jpg").read_bytes())
    fields = {"title": "Astronaut", "title_zh_hans": "", "prompt": "", "negative_prompt": "", "tags": "space",
              "published": "on", "image": image}
    response = staff_client.post(reverse("admin:studio_template_change", args=[template.pk]), fields)
    assert response.status_code == 302
    template.refresh_from_db()
    assert template.uploaded_by == owner and template.face_boxes
