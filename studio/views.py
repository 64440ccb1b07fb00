"""Thin views: check who is asking, call a service, render. Another person's object is a 404."""

from __future__ import annotations

import functools
import mimetypes
import posixpath
import re
from typing import Callable
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login, logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.files.storage import default_storage
from django.db.models import Prefetch, Q
from django.db.models.functions import Coalesce
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django.views.decorators.vary import vary_on_headers
from django_htmx.http import reswap, retarget

from studio import health, services
from studio.forms import DeleteDataForm, FaceConsentForm, PersonaForm, PhotoUploadForm, SignupForm, TemplateForm
from studio.models import Job, Persona, Photo, Portrait, Template, owner_folder


def post_with_get_back_to(page: str) -> Callable:
    """For a form's POST-only URL: a refused form is shown at that URL, so a reload or a later
    visit opens it with GET, which sends the person to the form's page instead of a blank 405."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def get_or_post(request: HttpRequest, **kwargs) -> HttpResponse:
            if request.method == "GET":
                return redirect(page, **kwargs)
            return view(request, **kwargs)

        return require_http_methods(["GET", "POST"])(get_or_post)

    return decorate


def home(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return render(request, "studio/landing.html")
    return _home_page(request, PersonaForm())


def _home_page(request: HttpRequest, form: PersonaForm, status: int = 200) -> HttpResponse:
    personas = Persona.objects.filter(owner=request.user)
    context = {"personas": personas, "form": form, "jobs": services.panel_jobs(request.user)}
    return render(request, "studio/home.html", context, status=status)


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("home")
    form = SignupForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, _("Welcome, %(name)s. Your account is ready.") % {"name": user.username})
        return redirect("home")
    return render(request, "registration/signup.html", {"form": form})


class PasswordResetConfirm(auth_views.PasswordResetConfirmView):
    """Django's reset, which also lifts a login lockout: the lockout page sends people here."""

    def form_valid(self, form) -> HttpResponse:
        response = super().form_valid(form)
        services.lift_login_lockout(form.user)
        return response


class LogOut(auth_views.LogoutView):
    """Django's logout, saying so on the page it leads to."""

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = super().post(request, *args, **kwargs)
        messages.info(request, _("You are logged out."))
        return response


def login_locked_out(request: HttpRequest, original_response=None, credentials=None) -> HttpResponse:
    """django-axes' lockout response: the login page's throttle message, with HTTP 429."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    return render(request, "registration/locked_out.html", {"cooloff_minutes": minutes}, status=429)


@login_required
@post_with_get_back_to("home")
def persona_create(request: HttpRequest) -> HttpResponse:
    form = PersonaForm(request.POST)
    if not form.is_valid():
        return _home_page(request, form, status=400)
    persona = services.create_persona(request.user, form.cleaned_data["name"])
    return redirect("persona", persona_id=persona.id)


def _persona_page(
    request: HttpRequest, persona: Persona, partial: str = "studio/_photos.html", **context
) -> HttpResponse:
    """The upload page; htmx requests get only `partial` (the photos panel after an upload)."""
    photos = list(persona.photos.all())
    accepted = sum(photo.status == Photo.Status.ACCEPTED for photo in photos)
    context = {
        "persona": persona,
        "photos": photos,
        "accepted": accepted,
        # Photos of several people wait for the person to choose (services.choose_person), not for a delete.
        "refused": sum(
            photo.status == Photo.Status.REJECTED and photo.reason_code != services.SEVERAL_PEOPLE for photo in photos
        ),
        "people": services.photo_groups(photos),
        "still_needed": max(0, settings.PHOTOS_NEEDED - accepted),
        "room": settings.PHOTOS_PER_PERSONA - len(photos),
        "has_consent": services.has_face_consent(request.user),
        "upload_form": PhotoUploadForm(room=settings.PHOTOS_PER_PERSONA - len(photos)),
        "consent_form": FaceConsentForm(),
        "jobs": services.panel_jobs(request.user),
        "buildable": services.RETRYABLE_PERSONA,
        **context,
    }
    template = partial if request.htmx else "studio/persona.html"
    return render(request, template, context, status=400 if context.get("invalid") else 200)


@login_required
@require_GET
@vary_on_headers("HX-Request")  # the page and its body share the URL: caches must keep both apart
def persona_detail(request: HttpRequest, persona_id: int) -> HttpResponse:
    """The page; an htmx GET (site.js, after a status change) gets its body."""
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    return _persona_page(request, persona, partial="studio/_persona_body.html")


@login_required
@post_with_get_back_to("persona")
def face_consent(request: HttpRequest, persona_id: int) -> HttpResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    form = FaceConsentForm(request.POST)
    if not form.is_valid():
        return _persona_page(request, persona, consent_form=form, invalid=True)
    services.give_face_consent(request.user)
    return redirect("persona", persona_id=persona.id)


@login_required
@post_with_get_back_to("persona")
def photo_upload(request: HttpRequest, persona_id: int) -> HttpResponse:
    """Without consent nothing is stored; refused files are listed with their reason."""
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    if not services.has_face_consent(request.user):
        return _persona_page(request, persona, invalid=True)
    form = PhotoUploadForm(request.POST, request.FILES, room=settings.PHOTOS_PER_PERSONA - persona.photos.count())
    if not form.is_valid():
        return _persona_page(request, persona, upload_form=form, invalid=True)
    try:
        refusals = services.add_photos(persona, form.cleaned_data["photos"], names=form.photo_names())
    except services.NotAllowed as refusal:
        return _back_to_persona(request, persona, str(refusal))
    if request.htmx:
        return _persona_page(request, persona, refusals=refusals)
    for refused in refusals:  # the page after the redirect lists them; a reload sends nothing again
        messages.warning(request, _("%(name)s: %(message)s") % {"name": refused.name, "message": refused.message})
    return redirect("persona", persona_id=persona.id)


def _back_to_persona(request: HttpRequest, persona: Persona, refusal: str) -> HttpResponse:
    """The whole persona page with why the action was refused: the double changed state (a build
    started in another tab, say), so the panel the person acted on is out of date."""
    messages.error(request, refusal)
    if request.htmx:
        return HttpResponse(headers={"HX-Redirect": reverse("persona", args=[persona.id])})
    return redirect("persona", persona_id=persona.id)


@login_required
@require_POST
def photo_delete(request: HttpRequest, photo_id: int) -> HttpResponse:
    photo = get_object_or_404(Photo, id=photo_id, owner=request.user)
    # A ready double's page lists its kept originals without htmx: the page says what went.
    done = _("The original photo is deleted.") if photo.persona.status == Persona.Status.READY else ""
    return _change_photos(request, photo.persona, lambda: services.delete_photo(photo), done)


@login_required
@require_POST
def refused_photos_delete(request: HttpRequest, persona_id: int) -> HttpResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    return _change_photos(request, persona, lambda: services.delete_refused_photos(persona))


@login_required
@require_POST
def person_choose(request: HttpRequest, persona_id: int) -> HttpResponse:
    """When the photos show several people: the person says who the double is (the photos of one
    group, `keep`); the other groups' photos are deleted."""
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    keep = {_id(value) for value in request.POST.getlist("keep")}
    return _change_photos(request, persona, lambda: services.choose_person(persona, keep))


def _change_photos(request: HttpRequest, persona: Persona, change: Callable[[], None], done: str = "") -> HttpResponse:
    """Makes a change to a double's photos; answers with the photo panel (htmx) or the page, or
    with why the change was refused."""
    try:
        change()
    except services.NotAllowed as refusal:
        return _back_to_persona(request, persona, str(refusal))
    if request.htmx:
        return _persona_page(request, persona)
    if done:
        messages.success(request, done)
    return redirect("persona", persona_id=persona.id)


@login_required
@require_GET
def account(request: HttpRequest) -> HttpResponse:
    return render(request, "studio/account.html")


def _visible_template_file(request: HttpRequest, path: str) -> bool:
    """A gallery file of a published template (staff also see drafts)."""
    if not path.startswith("gallery/"):
        return False
    shown = Template.objects.filter(Q(image=path) | Q(thumbnail=path))
    return request.user.is_staff or shown.filter(published=True).exists()


@never_cache
@require_GET
def media_file(request: HttpRequest, path: str) -> FileResponse:
    """Serves a stored file to its owner only; published templates' files to anyone signed in.

    Ownership is read from the path: every person's file lives under users/<owner id>/
    (see studio.models). Anything else, including another person's file, is a 404.
    """
    if not request.user.is_authenticated or posixpath.normpath(path) != path or path.startswith(("/", "..")):
        raise Http404
    own_file = path.startswith(owner_folder(request.user.id) + "/")
    if not (own_file or _visible_template_file(request, path)) or not default_storage.exists(path):
        raise Http404
    content_type, _encoding = mimetypes.guess_type(path)
    response = FileResponse(default_storage.open(path), content_type=content_type or "application/octet-stream")
    response["Cache-Control"] = "private, no-store"
    return response


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    checks = {
        "database": health.check_database(),
        "redis": health.check_redis(),
        "worker": health.check_workers(),
    }
    healthy = all(check["ok"] for check in checks.values())
    return JsonResponse({"ok": healthy, **checks}, status=200 if healthy else 503)


@login_required
@require_POST
def persona_build(request: HttpRequest, persona_id: int) -> HttpResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    try:
        services.request_training(persona, keep_photos=request.POST.get("keep_photos") == "on")
    except services.NotAllowed as refusal:
        messages.error(request, str(refusal))
    return redirect("persona", persona_id=persona.id)


@login_required
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    live = services.cancel_job(job)  # False: done, but the person's other pages hear of it later
    job.refresh_from_db()
    if request.htmx:
        return render(request, "studio/_job.html", {"job": job, "live_paused": not live})
    if job.status == Job.Status.CANCELLED:
        messages.success(request, _("“%(kind)s” is cancelled.") % {"kind": job.get_kind_display()})
    elif job.cancel_requested:
        messages.info(request, _("“%(kind)s” stops at its next step.") % {"kind": job.get_kind_display()})
    if not live:
        messages.info(request, _("Live updates resume shortly."))
    return redirect("home")


@login_required
@require_POST
def job_retry(request: HttpRequest, job_id: int) -> HttpResponse:
    """Tries a failed job again. htmx gets the job's fragment, waiting again (or with why it cannot
    be tried again); when the same request already waits or runs, the whole panel, which shows that
    one, with a word that it is on its way."""
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    try:
        standing = services.retry_failed_job(job)
    except services.NotAllowed as refusal:
        if request.htmx:
            return render(request, "studio/_job.html", {"job": job, "refusal": str(refusal)})
        messages.error(request, str(refusal))
        return redirect("home")
    kind = {"kind": standing.get_kind_display()}
    if standing.pk == job.pk:
        if request.htmx:
            return render(request, "studio/_job.html", {"job": standing})
        messages.success(request, _("“%(kind)s” is back in line.") % kind)
        return redirect("home")
    on_its_way = _("“%(kind)s” is already on its way.") % kind
    if request.htmx:
        response = render(request, "studio/_jobs.html", {"jobs": services.panel_jobs(request.user), "notice": on_its_way})
        return retarget(reswap(response, "outerHTML"), "#jobs")
    messages.info(request, on_its_way)
    return redirect("home")


@login_required
@require_POST
def job_dismiss(request: HttpRequest, job_id: int) -> HttpResponse:
    """Puts a failed job away from the jobs panel; htmx gets its fragment (hidden once put away)."""
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    put_away = services.dismiss_job(job)
    if request.htmx:
        return render(request, "studio/_job.html", {"job": job})
    if put_away:
        messages.success(request, _("“%(kind)s” is removed from your jobs.") % {"kind": job.get_kind_display()})
    return redirect("home")


@login_required
@require_GET
def jobs_panel(request: HttpRequest) -> HttpResponse:
    """The jobs panel alone: what pages poll while their websocket is down."""
    return render(request, "studio/_jobs.html", {"jobs": services.panel_jobs(request.user)})


@login_required
@require_GET
def gallery(request: HttpRequest) -> HttpResponse:
    """Published templates; staff also see drafts, marked, so a template they added is not lost."""
    tag = request.GET.get("tag", "").strip()
    shown = Template.objects.all() if request.user.is_staff else Template.objects.filter(published=True)
    templates = shown.filter(tags__iregex=rf"(^|,)\s*{re.escape(tag)}\s*(,|$)") if tag else shown
    # One link per tag whatever its case ("Formal" and "formal" filter alike), spelt as first seen.
    tags: dict[str, str] = {}
    for template in shown:
        for name in template.tag_list:
            tags.setdefault(name.lower(), name)  # lower(), as the iregex filter compares
    context = {
        "templates": templates,
        "tag": tags.get(tag.lower(), tag),
        "tags": sorted(tags.values(), key=str.lower),
        "personas": Persona.objects.filter(owner=request.user, status=Persona.Status.READY),
        "chosen_persona": _id(request.GET.get("persona")),
    }
    return render(request, "studio/gallery.html", context)


def _id(value: str | None) -> int:
    """A primary key from form data; anything else becomes 0, which matches no row."""
    return int(value) if value and value.isascii() and value.isdecimal() else 0


@login_required
@require_POST
def portraits_request(request: HttpRequest) -> HttpResponse:
    persona = get_object_or_404(Persona, id=_id(request.POST.get("persona")), owner=request.user)
    ids = [_id(value) for value in request.POST.getlist("templates")]
    templates = list(Template.objects.filter(published=True, id__in=ids))
    try:
        services.request_portraits(persona, templates)
    except services.NotAllowed as refusal:
        messages.error(request, str(refusal))
        # Back to the gallery as the person left it: the same tag and double chosen.
        return redirect(f"{reverse('gallery')}?{urlencode({'tag': request.POST.get('tag', ''), 'persona': persona.id})}")
    messages.success(request, _("Your portraits are on their way. They appear in your album as they are ready."))
    return redirect("album")


@login_required
@require_http_methods(["GET", "POST"])
def template_new(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise Http404
    form = TemplateForm(*([request.POST, request.FILES] if request.method == "POST" else []))
    if request.method == "POST" and form.is_valid():
        template = services.add_template(form, uploaded_by=request.user)
        if note := services.template_faces_note(template):
            messages.warning(request, note)
        if template.published:
            messages.success(request, _("Template “%(title)s” added.") % {"title": template.title})
        else:
            messages.success(request, _("Template “%(title)s” added as a draft: only staff see it until it is published.")
                             % {"title": template.title})
        return redirect("gallery")
    return render(request, "studio/template_form.html", {"form": form}, status=400 if form.errors else 200)


@login_required
@require_GET
def album(request: HttpRequest) -> HttpResponse:
    """Each double's portraits, newest first, or with `?sort=likeness` most alike first (by the
    cosine the likeness shown is read from, Portrait.likeness; no face found comes last)."""
    by_likeness = request.GET.get("sort") == "likeness"
    shown_similarity = Coalesce("held_out_similarity", "identity_similarity")
    order = [shown_similarity.desc(nulls_last=True), "-created"] if by_likeness else ["-created"]
    portraits = Prefetch("portraits", queryset=Portrait.objects.select_related("template").order_by(*order))
    personas = Persona.objects.filter(owner=request.user).prefetch_related(portraits)
    groups = [(persona, list(persona.portraits.all())) for persona in personas]
    context = {
        "groups": [(p, ps) for p, ps in groups if ps],
        "jobs": services.panel_jobs(request.user),
        "by_likeness": by_likeness,
    }
    return render(request, "studio/album.html", context)


@login_required
@require_GET
def portrait_detail(request: HttpRequest, portrait_id: int) -> HttpResponse:
    portrait = get_object_or_404(Portrait, id=portrait_id, owner=request.user)
    return render(request, "studio/portrait.html", {"portrait": portrait})


@login_required
@require_GET
def portrait_download(request: HttpRequest, portrait_id: int) -> FileResponse:
    portrait = get_object_or_404(Portrait, id=portrait_id, owner=request.user)
    return FileResponse(portrait.image.open("rb"), as_attachment=True, filename=portrait.file_name)


@login_required
@require_GET
def album_zip(request: HttpRequest, persona_id: int) -> FileResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    archive = services.album_archive(persona)
    name = slugify(persona.name, allow_unicode=True) or str(persona.id)
    return FileResponse(archive, as_attachment=True, filename=_("%(name)s-portraits.zip") % {"name": name})


@login_required
@require_POST
def portrait_delete(request: HttpRequest, portrait_id: int) -> HttpResponse:
    portrait = get_object_or_404(Portrait, id=portrait_id, owner=request.user)
    if not _confirmed(request):
        return redirect("portrait", portrait_id=portrait.id)
    portrait.delete()
    messages.success(request, _("The portrait is deleted."))
    return redirect("album")


def _confirmed(request: HttpRequest) -> bool:
    """Whether the form's "I mean it" box is ticked (deletes for good ask for one); if not, says so."""
    if request.POST.get("confirm") == "on":
        return True
    messages.error(request, _("Nothing was deleted: tick the box to confirm."))
    return False


@login_required
@require_POST
def album_delete(request: HttpRequest, persona_id: int) -> HttpResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    if _confirmed(request):
        count, _by_model = persona.portraits.all().delete()  # each row's post_delete removes its files
        messages.success(
            request,
            ngettext("%(count)d portrait of %(name)s is deleted.", "%(count)d portraits of %(name)s are deleted.", count)
            % {"count": count, "name": persona.name},
        )
    return redirect("album")


@login_required
@require_POST
def persona_delete(request: HttpRequest, persona_id: int) -> HttpResponse:
    persona = get_object_or_404(Persona, id=persona_id, owner=request.user)
    if not _confirmed(request):
        return redirect("persona", persona_id=persona.id)
    try:
        services.delete_persona(persona)
    except services.NotAllowed as refusal:
        messages.error(request, str(refusal))
        return redirect("persona", persona_id=persona.id)
    messages.success(request, _("“%(name)s”, its photos and its portraits are deleted.") % {"name": persona.name})
    return redirect("home")


@login_required
@require_http_methods(["GET", "POST"])
def delete_data(request: HttpRequest) -> HttpResponse:
    form = DeleteDataForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        delete_account = form.cleaned_data["delete_account"]
        services.delete_all_data(request.user, delete_account=delete_account)
        if delete_account:
            logout(request)
            messages.success(request, _("Your account and all your data are deleted."))
            return redirect("home")
        messages.success(request, _("All your photos, doubles and portraits are deleted."))
        return redirect("account")
    return render(request, "studio/delete_data.html", {"form": form}, status=400 if form.errors else 200)
