from django.contrib import admin, messages
from django.db import models, transaction
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from studio import services
from studio.forms import TemplateForm
from studio.models import FaceConsent, Job, Persona, Photo, Portrait, Template


class OwnersFilesAdmin(admin.ModelAdmin):
    """A person's files are served to them alone (studio.views.media_file): the admin shows their
    stored names, not links that answer 404, and cannot replace them. People make these rows
    themselves: a row added here would have no file, and break its owner's pages."""

    def has_add_permission(self, request) -> bool:
        return False

    def _file_fields(self) -> list[str]:
        return [field.name for field in self.model._meta.fields if isinstance(field, models.FileField)]

    def get_exclude(self, request, obj=None) -> list[str]:
        return [*(super().get_exclude(request, obj) or []), *self._file_fields()]

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        return [*super().get_readonly_fields(request, obj), "stored_files"]

    @admin.display(description=_("stored files"))
    def stored_files(self, obj: models.Model) -> str:
        return ", ".join(getattr(obj, name).name for name in self._file_fields() if getattr(obj, name)) or "-"


def two_places(value: float | None) -> str:
    """A score as the site shows it."""
    return "-" if value is None else f"{value:.2f}"


@admin.register(Persona)
class PersonaAdmin(OwnersFilesAdmin):
    list_display = ["name", "owner", "status", "engine", "identity", "created"]
    list_filter = ["status", "engine"]
    search_fields = ["name", "owner__username"]
    raw_id_fields = ["owner"]

    @admin.display(description=_("identity score"), ordering="identity_score")
    def identity(self, persona: Persona) -> str:
        return two_places(persona.identity_score)


@admin.register(Photo)
class PhotoAdmin(OwnersFilesAdmin):
    list_display = ["id", "owner", "persona", "original_name", "status", "reason_code", "created"]
    list_filter = ["status", "reason_code"]
    readonly_fields = ["owner", "persona"]  # a photo stays with the double it was given to


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    """Uses the staff page's form, so faces are checked and the image re-encoded here too."""

    form = TemplateForm
    list_display = ["title", "title_zh_hans", "tags", "published", "uploaded_by", "created"]
    list_filter = ["published"]
    search_fields = ["title", "title_zh_hans", "tags"]
    readonly_fields = ["face_boxes", "uploaded_by"]

    def has_delete_permission(self, request, obj=None) -> bool:
        """Not while a portrait job waits for it or renders it (staff may unpublish it instead):
        deleted, it would silently leave the person's job without it."""
        in_use = obj is not None and obj.job_set.filter(status__in=Job.ACTIVE).exists()
        return super().has_delete_permission(request, obj) and not in_use

    def save_model(self, request, obj, form, change) -> None:
        if "image" in form.changed_data:
            # A new image for an existing template keeps who uploaded it.
            uploaded_by = obj.uploaded_by if change else request.user
            template = services.add_template(form, uploaded_by=uploaded_by)
            if note := services.template_faces_note(template):
                self.message_user(request, note, messages.WARNING)
        else:
            super().save_model(request, obj, form, change)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    """Staff cancel jobs as the person would (services.cancel_job). A deleted running job would
    leave its double stuck at "Training" and its worker storing results for a row that is gone,
    so it cannot be deleted; a waiting one is cancelled first, which frees its double."""

    list_display = ["id", "kind", "owner", "persona", "status", "stage", "progress", "created", "finished"]
    list_filter = ["kind", "status"]
    raw_id_fields = ["owner", "persona"]
    readonly_fields = ["owner", "rq_job_id", "error_detail"]
    actions = ["cancel"]

    def has_delete_permission(self, request, obj=None) -> bool:
        running = obj is not None and obj.status == Job.Status.RUNNING
        return super().has_delete_permission(request, obj) and not running

    def delete_model(self, request, obj: Job) -> None:
        self.delete_queryset(request, Job.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():
            # Locked (PostgreSQL), so no worker starts one of them between the cancel and the delete.
            for job in queryset.filter(status__in=Job.ACTIVE).select_for_update(of=("self",)).select_related("persona"):
                services.cancel_job(job)
            started = queryset.filter(status=Job.Status.RUNNING).count()  # since the confirmation page
            queryset.exclude(status=Job.Status.RUNNING).delete()
        if started:
            self.message_user(
                request,
                ngettext(
                    "%(count)d job had started, so it was not deleted: it stops at its next step.",
                    "%(count)d jobs had started, so they were not deleted: they stop at their next step.",
                    started,
                ) % {"count": started},
                messages.WARNING,
            )

    @admin.action(description=_("Cancel the selected jobs"))
    def cancel(self, request, queryset) -> None:
        waiting = list(queryset.filter(status=Job.Status.QUEUED).select_related("persona"))
        running = list(queryset.filter(status=Job.Status.RUNNING, cancel_requested=False).select_related("persona"))
        for job in [*waiting, *running]:
            services.cancel_job(job)
        if waiting or not running:
            self.message_user(
                request,
                ngettext("%(count)d waiting job cancelled.", "%(count)d waiting jobs cancelled.", len(waiting))
                % {"count": len(waiting)},
            )
        if running:
            self.message_user(
                request,
                ngettext(
                    "%(count)d running job stops at its next step.",
                    "%(count)d running jobs stop at their next step.",
                    len(running),
                ) % {"count": len(running)},
            )


@admin.register(Portrait)
class PortraitAdmin(OwnersFilesAdmin):
    list_display = ["id", "owner", "persona", "template", "identity", "created"]
    readonly_fields = ["owner", "persona", "job"]

    @admin.display(description=_("identity similarity"), ordering="identity_similarity")
    def identity(self, portrait: Portrait) -> str:
        return two_places(portrait.identity_similarity)


@admin.register(FaceConsent)
class FaceConsentAdmin(admin.ModelAdmin):
    list_display = ["owner", "version", "created"]
    raw_id_fields = ["owner"]
