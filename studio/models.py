"""The studio's data: a person's photos and digital doubles, staff templates, jobs, portraits.

Invariant kept by every model here: a file that belongs to a person is stored under
`users/<owner id>/`, and every row that belongs to a person has an `owner`. The media view
(`studio.views.media_file`) relies on the first; every person-facing query filters on the
second, so another person's object is a 404.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import PurePosixPath

from django.conf import settings
from django.db import models
from django.utils import translation
from django.utils.text import slugify
from django.utils.translation import gettext_lazy as _

from pipeline.faces import THRESHOLDS, likeness


def owner_folder(owner_id: int) -> str:
    return f"users/{owner_id}"


def _random_name(folder: str, filename: str) -> str:
    suffix = PurePosixPath(filename).suffix.lower()[:10]
    return f"{folder}/{uuid.uuid4().hex}{suffix}"


def upload_photo(instance: "Photo", filename: str) -> str:
    # The persona decides the owner: the file may be saved before the row is.
    return _random_name(f"{owner_folder(instance.persona.owner_id)}/photos", filename)


def upload_persona_file(instance: "Persona", filename: str) -> str:
    return _random_name(f"{owner_folder(instance.owner_id)}/personas", filename)


def upload_portrait(instance: "Portrait", filename: str) -> str:
    return _random_name(f"{owner_folder(instance.persona.owner_id)}/portraits", filename)


def upload_template(instance: models.Model, filename: str) -> str:
    """Templates are staff content, shown to every signed-in person."""
    return _random_name("gallery", filename)


class OwnedModel(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, verbose_name=_("owner"))
    created = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        abstract = True


class FaceConsent(OwnedModel):
    """A person's explicit consent to processing their face, for one version of the wording."""

    CURRENT_VERSION = "2026-11-v1"

    version = models.CharField(_("version"), max_length=40)

    class Meta:
        verbose_name = _("face consent")
        verbose_name_plural = _("face consents")
        constraints = [models.UniqueConstraint(fields=["owner", "version"], name="one_consent_per_version")]


class PersonaPart(OwnedModel):
    """A row that belongs to a digital double; its owner is always the double's owner."""

    persona = models.ForeignKey(
        "Persona", on_delete=models.CASCADE, related_name="%(class)ss", verbose_name=_("digital double")
    )

    class Meta:
        abstract = True

    def save(self, *args, **kwargs) -> None:
        self.owner_id = self.persona.owner_id
        super().save(*args, **kwargs)


class Persona(OwnedModel):
    """A digital double: the photos of one person and the LoRA trained from them."""

    class Status(models.TextChoices):
        DRAFT = "draft", _("Draft")
        QUEUED = "queued", _("Queued")
        PREPROCESSING = "preprocessing", _("Preparing photos")
        TRAINING = "training", _("Training")
        VALIDATING = "validating", _("Validating")
        READY = "ready", _("Ready")
        FAILED = "failed", _("Failed")
        CANCELLED = "cancelled", _("Cancelled")

    class Engine(models.TextChoices):
        CLASSIC = "classic", _("classic face fusion (no diffusion model)")
        DIFFUSION = "diffusion", _("a personal Stable Diffusion LoRA")

    name = models.CharField(_("name"), max_length=80)
    status = models.CharField(_("status"), max_length=20, choices=Status.choices, default=Status.DRAFT)
    keep_photos = models.BooleanField(
        _("keep my photos"), default=False, help_text=_("Keep the original selfies after the double is built.")
    )
    engine = models.CharField(_("engine"), max_length=20, choices=Engine.choices, blank=True)
    lora_file = models.FileField(_("LoRA file"), upload_to=upload_persona_file, blank=True)
    reference_face = models.FileField(_("reference face"), upload_to=upload_persona_file, blank=True)
    best_face = models.FileField(_("best validation face"), upload_to=upload_persona_file, blank=True)
    identity_score = models.FloatField(_("identity score"), null=True, blank=True)
    # The preprocessed training set (pipeline.preprocess's folder, zipped): crops, scores,
    # embeddings and the reference face. Training reads it; it stays until the double goes.
    preprocessed = models.FileField(_("preprocessed photos"), upload_to=upload_persona_file, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = _("digital double")
        verbose_name_plural = _("digital doubles")

    def __str__(self) -> str:
        return self.name


class Photo(PersonaPart):
    """One uploaded selfie, stored re-encoded without metadata, with its face analysis."""

    class Status(models.TextChoices):
        PENDING = "pending", _("Being checked")
        ACCEPTED = "accepted", _("Accepted")
        REJECTED = "rejected", _("Refused")

    image = models.FileField(_("image"), upload_to=upload_photo)
    # What the photo pages show: a phone's 20 full-size selfies would be tens of megabytes.
    thumbnail = models.FileField(_("thumbnail"), upload_to=upload_photo, blank=True)
    status = models.CharField(_("status"), max_length=20, choices=Status.choices, default=Status.PENDING)
    reason_code = models.CharField(_("reason code"), max_length=40, blank=True)
    analysis = models.JSONField(_("face analysis"), default=dict, blank=True)
    # Of the stored (cleaned) image: the same file sent again cleans to the same bytes.
    sha256 = models.CharField(_("SHA-256"), max_length=64, blank=True, editable=False)
    # As the person's device named it: how they tell a refused photo among twenty apart.
    original_name = models.CharField(_("file name"), max_length=255, blank=True)

    class Meta:
        ordering = ["created"]
        verbose_name = _("photo")
        verbose_name_plural = _("photos")



class Template(models.Model):
    """A portrait style curated by staff; published ones appear in everyone's gallery."""

    title = models.CharField(_("title"), max_length=120)
    title_zh_hans = models.CharField(
        _("title in Simplified Chinese"), max_length=120, blank=True,
        help_text=_("Shown on Chinese pages; where it is empty, they show the title above."),
    )
    image = models.ImageField(_("image"), upload_to=upload_template)
    thumbnail = models.ImageField(_("thumbnail"), upload_to=upload_template, blank=True)
    prompt = models.TextField(
        _("prompt"),
        blank=True,
        help_text=_(
            "Words for this style, added to the default prompt, for example: red scarf, (studio light:1.2). "
            "Round brackets give words more weight and square ones less, as in the webui."
        ),
    )
    negative_prompt = models.TextField(
        _("negative prompt"), blank=True, help_text=_("What this style should avoid, added to the default list.")
    )
    tags = models.CharField(_("tags"), max_length=200, blank=True, help_text=_("Comma-separated."))
    face_boxes = models.JSONField(_("face boxes"), default=list, blank=True)
    published = models.BooleanField(_("published"), default=False)
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, verbose_name=_("uploaded by")
    )
    created = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = _("template")
        verbose_name_plural = _("templates")

    def __str__(self) -> str:
        return self.title

    @property
    def shown_title(self) -> str:
        """The title in the page's language: staff content, so not in the translation catalogue."""
        if self.title_zh_hans and translation.get_language() == "zh-hans":
            return self.title_zh_hans
        return self.title

    @property
    def tag_list(self) -> list[str]:
        return [tag.strip() for tag in self.tags.split(",") if tag.strip()]


class Job(PersonaPart):
    """One unit of GPU work, mirrored from RQ so pages can show it without asking Redis."""

    class Kind(models.TextChoices):
        TRAIN = "train", _("Build digital double")
        GENERATE = "generate", _("Make portraits")

    class Status(models.TextChoices):
        QUEUED = "queued", _("Waiting")
        RUNNING = "running", _("Running")
        SUCCEEDED = "succeeded", _("Done")
        FAILED = "failed", _("Failed")
        CANCELLED = "cancelled", _("Cancelled")

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    kind = models.CharField(_("kind"), max_length=20, choices=Kind.choices)
    templates = models.ManyToManyField(Template, blank=True, verbose_name=_("templates"))
    # Which templates a portrait job was asked for (Job.templates_key_of); empty for a build.
    templates_key = models.CharField(_("templates asked for"), max_length=64, blank=True, editable=False)
    status = models.CharField(_("status"), max_length=20, choices=Status.choices, default=Status.QUEUED)
    stage = models.CharField(_("stage"), max_length=40, blank=True)
    progress = models.FloatField(_("progress"), default=0.0)
    rq_job_id = models.CharField(_("RQ job id"), max_length=64, blank=True)
    cancel_requested = models.BooleanField(_("cancel requested"), default=False)
    attempts = models.PositiveSmallIntegerField(_("retries after passing failures"), default=0)
    # Written by a thread of the job's run; a running job whose heartbeat stops has lost its worker.
    heartbeat = models.DateTimeField(_("heartbeat"), null=True, blank=True)
    # The RQ worker running it: its registration in Redis says within seconds whether it still lives
    # (studio.services.recover_lost_jobs), and only that run may record how the job ended.
    worker = models.CharField(_("worker"), max_length=100, blank=True, editable=False)
    lost_workers = models.PositiveSmallIntegerField(_("workers lost while running it"), default=0)
    started = models.DateTimeField(_("started"), null=True, blank=True)
    finished = models.DateTimeField(_("finished"), null=True, blank=True)
    error_for_person = models.TextField(_("error shown to the person"), blank=True)
    error_detail = models.TextField(_("error detail for staff"), blank=True)
    # A failure stays in the person's jobs panel until they act on it: this is when they put it
    # away without trying again (studio.services.panel_jobs).
    dismissed_at = models.DateTimeField(_("failure put away by the person"), null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = _("job")
        verbose_name_plural = _("jobs")
        constraints = [
            models.CheckConstraint(
                condition=models.Q(progress__gte=0.0, progress__lte=1.0), name="job_progress_between_0_and_1"
            ),
            # A request sent twice (a double click) is one job: one build of a double at a time,
            # and one job per choice of templates until it has run. One that is stopping no
            # longer counts: the same request made again is a new job.
            models.UniqueConstraint(
                fields=["persona", "kind", "templates_key"],
                condition=models.Q(status__in=["queued", "running"], cancel_requested=False),  # Job.ACTIVE
                name="one_active_job_per_request",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} #{self.pk}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @staticmethod
    def templates_key_of(templates: list[Template]) -> str:
        return hashlib.sha256(",".join(str(pk) for pk in sorted({t.pk for t in templates})).encode()).hexdigest()


def _likeness(similarity: float | None) -> int | None:
    return None if similarity is None else round(likeness(similarity, THRESHOLDS[settings.FACE_BACKEND]))


class Portrait(PersonaPart):
    """One rendered portrait in a person's private album."""

    template = models.ForeignKey(Template, on_delete=models.SET_NULL, null=True, blank=True, verbose_name=_("template"))
    job = models.ForeignKey(Job, on_delete=models.SET_NULL, null=True, blank=True, verbose_name=_("job"))
    image = models.ImageField(_("image"), upload_to=upload_portrait)
    thumbnail = models.ImageField(_("thumbnail"), upload_to=upload_portrait, blank=True)
    identity_similarity = models.FloatField(_("identity similarity"), null=True, blank=True)
    # To the photo preprocessing kept out of training and fusion (pipeline.preprocess step 4), for
    # doubles that have one: the honest likeness, since the reference is pasted in.
    held_out_similarity = models.FloatField(_("similarity to the held-out photo"), null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        verbose_name = _("portrait")
        verbose_name_plural = _("portraits")
        constraints = [
            # A job run again (a retry, a lost worker, a shutdown) renders only what is missing: one
            # portrait per template asked for. Portraits of deleted jobs or templates (NULL) never clash.
            models.UniqueConstraint(fields=["job", "template"], name="one_portrait_per_job_and_template"),
        ]

    @property
    def likeness(self) -> int | None:
        """The 0-100 likeness people see (pipeline.faces.likeness): to the held-out photo where the
        double has one, else to the reference photo. Read with the site's face backend, the one
        that measured it."""
        return _likeness(self.identity_similarity if self.held_out_similarity is None else self.held_out_similarity)

    @property
    def copy_paste(self) -> int | None:
        """How many likeness points the portrait is closer to the photo its face was fused from than
        to the held-out one: near 0 is a likeness of the person, a large gap a pasted photo."""
        if self.held_out_similarity is None or self.identity_similarity is None:
            return None
        return _likeness(self.identity_similarity) - _likeness(self.held_out_similarity)

    @property
    def file_name(self) -> str:
        """What a download of it is called: its double, its template and its number."""
        title = self.template.title if self.template else ""
        words = [slugify(self.persona.name, allow_unicode=True), slugify(title, allow_unicode=True), str(self.id)]
        return "-".join(word for word in words if word) + PurePosixPath(self.image.name).suffix
