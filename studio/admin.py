from django.contrib import admin, messages

from studio import services
from studio.forms import TemplateForm
from studio.models import FaceConsent, Job, Persona, Photo, Portrait, Template


@admin.register(Persona)
class PersonaAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "status", "engine", "identity_score", "created"]
    list_filter = ["status", "engine"]
    search_fields = ["name", "owner__username"]
    raw_id_fields = ["owner"]


@admin.register(Photo)
class PhotoAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "persona", "original_name", "status", "reason_code", "created"]
    list_filter = ["status", "reason_code"]
    raw_id_fields = ["owner", "persona"]
    readonly_fields = ["owner"]


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    """Uses the staff page's form, so faces are checked and the image re-encoded here too."""

    form = TemplateForm
    list_display = ["title", "tags", "published", "uploaded_by", "created"]
    list_filter = ["published"]
    search_fields = ["title", "tags"]
    readonly_fields = ["face_boxes", "uploaded_by"]

    def save_model(self, request, obj, form, change) -> None:
        if "image" in form.changed_data:
            template = services.add_template(form, uploaded_by=request.user)
            if note := services.template_faces_note(template):
                self.message_user(request, note, messages.WARNING)
        else:
            super().save_model(request, obj, form, change)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "owner", "persona", "status", "stage", "progress", "created", "finished"]
    list_filter = ["kind", "status"]
    raw_id_fields = ["owner", "persona"]
    readonly_fields = ["owner", "rq_job_id", "error_detail"]


@admin.register(Portrait)
class PortraitAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "persona", "template", "identity_similarity", "created"]
    raw_id_fields = ["owner", "persona", "job"]
    readonly_fields = ["owner"]


@admin.register(FaceConsent)
class FaceConsentAdmin(admin.ModelAdmin):
    list_display = ["owner", "version", "created"]
    raw_id_fields = ["owner"]
