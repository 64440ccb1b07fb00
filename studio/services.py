"""The studio's actions. Views and jobs call these; nothing here reads a request."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import django_rq
import redis
from asgiref.sync import async_to_sync
from axes.models import AccessAttempt, AccessLog
from axes.utils import reset as axes_reset
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, models, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.template.loader import render_to_string
from django.utils import timezone, translation
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from PIL import Image
from rq import Worker as RQWorker
from rq.job import Job as RQJob
from rq.job import JobStatus

from pipeline.common import Cancelled, CancelToken, ProgressCallback, gettext_noop
from pipeline.faces import FaceAnalyzer, largest_face_embeddings, load_face_analyzer
from pipeline.generate import DiffusionEngine, analyse_template
from pipeline.models import check_models, load_models
from pipeline.preprocess import (
    CutOuts, PhotoCheck, PreprocessConfig, PreprocessResult, preprocess, turned, write_preprocessed,
)
from pipeline.swapper import LearnedSwapper
from pipeline.train import TrainConfig, ValidationTemplate, read_preprocessed, train_persona, without_identity
from studio import training_folders
from studio.models import FaceConsent, Job, Persona, Photo, Portrait, Template, owner_folder
from studio.uploads import Refusal, RefusedFile, clean_photo, display_name

log = logging.getLogger(__name__)


def user_group(user_id: int) -> str:
    """The Channels group that carries one person's live updates, and only theirs."""
    return f"user-{user_id}"


def create_persona(owner: AbstractBaseUser, name: str) -> Persona:
    return Persona.objects.create(owner=owner, name=name.strip())


def panel_jobs(owner: AbstractBaseUser) -> list[Job]:
    """The jobs panel: what waits or runs, and every failure the person has not acted on yet, however
    long ago, so that why it failed can still be read after a reload. A failure goes once they try
    it again (retry_failed_job), put it away (dismiss_job), ask for the same thing again (a newer
    job of the same build, or of portraits of the same templates) or delete the double. A job of
    theirs whose worker is gone is recovered first: the panel never shows a dead job "running"."""
    _if_redis_answers(lambda: recover_lost_jobs(Job.objects.filter(owner=owner)), "looking for lost jobs")
    asked_again = Job.objects.filter(
        persona=OuterRef("persona"), kind=OuterRef("kind"), templates_key=OuterRef("templates_key"),
        created__gt=OuterRef("created"),
    )
    not_acted_on = Q(status=Job.Status.FAILED, dismissed_at__isnull=True) & ~Exists(asked_again)
    shown = Job.objects.filter(Q(status__in=Job.ACTIVE) | not_acted_on, owner=owner)
    return list(shown.select_related("persona"))


def render_live_state(owner: AbstractBaseUser, language: str) -> str:
    """What a socket gets on connect: the jobs panel and every double's status, as OOB fragments.

    So a page catches up with whatever changed between its render and its socket opening.
    """
    with translation.override(language):
        parts = [render_to_string("studio/_jobs.html", {"jobs": panel_jobs(owner), "oob": True})]
        parts += [
            render_to_string("studio/_persona_status.html", {"persona": persona, "oob": True})
            for persona in Persona.objects.filter(owner=owner)
        ]
    return "\n".join(parts)


def publish_job(job: Job) -> bool:
    """Sends the job's current state to its owner's open pages as an htmx OOB fragment; False when
    Redis cannot be reached (the pages poll until their socket is back)."""
    return _send(job.owner_id, "studio/_job.html", {"job": job, "oob": True})


def enqueue(
    queue_name: str, func: Callable[..., Any] | str, *args: Any, job_id: str | None = None, timeout_s: int | None = None
) -> RQJob:
    """Puts work on an RQ queue with a timeout (default: the queue's) and the failure TTL from settings."""
    queue = django_rq.get_queue(queue_name)
    return queue.enqueue(
        func,
        *args,
        job_id=job_id,
        job_timeout=timeout_s or settings.RQ_QUEUES[queue_name]["DEFAULT_TIMEOUT"],
        failure_ttl=settings.JOB_FAILURE_TTL_S,
    )


def has_face_consent(owner: AbstractBaseUser) -> bool:
    return FaceConsent.objects.filter(owner=owner, version=FaceConsent.CURRENT_VERSION).exists()


def give_face_consent(owner: AbstractBaseUser) -> FaceConsent:
    consent, _created = FaceConsent.objects.get_or_create(owner=owner, version=FaceConsent.CURRENT_VERSION)
    return consent


@functools.cache
def face_analyzer() -> FaceAnalyzer:
    """The configured face backend, loaded once per process (dlib's models take ~2 s)."""
    return load_face_analyzer(settings.FACE_BACKEND, settings.FACE_MODEL_DIR)


@functools.cache
def face_swapper() -> LearnedSwapper | None:
    """The operator's learned face swapper (FACE_SWAPPER_MODEL), loaded once per process; None
    when none is configured, and portraits fuse by the classic fusion."""
    return LearnedSwapper(settings.FACE_SWAPPER_MODEL) if settings.FACE_SWAPPER_MODEL else None


def add_photos(persona: Persona, uploads: list[UploadedFile], names: Sequence[str] | None = None) -> list[Refusal]:
    """Stores every upload that passes the file checks, then analyses the persona's photos.

    Every file gets its own verdict: one that cannot be decoded or analysed is refused alone, by
    its name (`names`, the files' names on the person's device; their upload names by default),
    and leaves no file and no row; the rest are kept. Whatever fails, no photo of this request is
    left "being checked": the rows it stored go before the error does.
    """
    _check_photos_can_change(persona)
    sent = names if names is not None else [""] * len(uploads)
    # The upload's own name where the one sent has nothing printable.
    names = [display_name(name) or display_name(upload.name or "") for name, upload in zip(sent, uploads, strict=True)]
    refusals: list[Refusal] = []
    stored: list[Photo] = []
    present = set(persona.photos.exclude(sha256="").values_list("sha256", flat=True))
    try:
        for upload, name in zip(uploads, names):
            try:
                jpeg = clean_photo(upload)
            except RefusedFile as refused:
                refusals.append(Refusal(name, str(refused.message)))
                continue
            if (digest := hashlib.sha256(jpeg).hexdigest()) in present:  # the same file sent again
                refusals.append(Refusal(name, _("This photo is already among this double's photos.")))
                continue
            present.add(digest)
            stored.append(_store_photo(persona, jpeg, digest, name))
    except Exception:
        _delete_photos(stored)
        raise
    if stored:
        refusals += _analyse_new_photos(persona, stored)
    return refusals


def _store_photo(persona: Persona, jpeg: bytes, digest: str, name: str) -> Photo:
    """A new photo's file and row, "being checked" until analysed; its thumbnail comes with that."""
    photo = Photo(persona=persona, sha256=digest, original_name=name)
    try:
        photo.image.save(f"{uuid.uuid4().hex}.jpg", ContentFile(jpeg), save=True)
    except Exception:
        _delete_stored(photo.image)  # no selfie without its row
        raise
    return photo


def _delete_photos(photos: list[Photo]) -> None:
    """Deletes the rows (and so the files) a request stored, when it cannot finish."""
    for photo in photos:
        photo.delete()


def _analyse_new_photos(persona: Persona, new: list[Photo]) -> list[Refusal]:
    """Analyses the persona with its new photos; a new photo that cannot be analysed is refused
    alone.

    When the analysis fails, each new photo is analysed on its own to find those that fail:
    they are deleted and refused by name, and the rest analysed again. A failure no single photo
    explains (the disk, the database) deletes the new photos and says so: retrying may help.
    """
    try:
        analyse_persona(persona)
        return []
    except Exception:
        log.exception("analysing the photos of persona %s failed; analysing its new photos one by one", persona.pk)
    analysable = {photo.pk: _analyses_alone(photo) for photo in new}
    failed = [photo for photo in new if not analysable[photo.pk]]
    kept = [photo for photo in new if analysable[photo.pk]]
    _delete_photos(failed)
    try:
        if kept:
            analyse_persona(persona)
    except Exception:
        log.exception("analysing the photos of persona %s failed again", persona.pk)
        _delete_photos(kept)  # and their files: nothing half-done stays
        raise NotAllowed(_("We could not analyse these photos just now. Please try again.")) from None
    message = _("We could not analyse this photo. Please try another one.")
    return [Refusal(photo.original_name, message) for photo in failed]


def _analyses_alone(photo: Photo) -> bool:
    """Whether one photo's analysis (face checks, crop, cut-out, thumbnail) runs on its own."""
    try:
        with photo.image.open("rb") as stored:
            data = stored.read()
        (check,) = preprocess([(str(photo.id), data)], face_analyzer()).checks
        thumbnail_jpeg(data, face=check.face.box if check.face is not None else None, aspect=1.0, turn=check.turn)
    except Exception:
        log.exception("photo %s of persona %s cannot be analysed", photo.pk, photo.persona_id)
        return False
    return True


def _delete_stored(*files) -> None:
    """Removes the files of a row that was not written."""
    for stored in files:
        if stored:
            stored.delete(save=False)


def analyse_persona(persona: Persona) -> PreprocessResult:
    """Runs face analysis and selection over all of the persona's photos and stores the result.

    Every photo gets its decision and scores; the preprocessed folder (crops, embeddings,
    reference face) is stored zipped on the persona, replacing the previous one. What the face
    checks found is kept on each photo, so the next upload or delete analyses only new photos.
    """
    photos = list(persona.photos.all())
    inputs = []
    for photo in photos:
        with photo.image.open("rb") as stored:
            inputs.append((str(photo.id), stored.read()))
    known = {str(photo.id): check for photo in photos if (check := _stored_check(photo)) is not None}
    config = PreprocessConfig(held_out_from=settings.HELD_OUT_FROM)
    result = preprocess(inputs, face_analyzer(), config, known=known, cut=_stored_cuts(persona))
    with tempfile.TemporaryDirectory(prefix="photobooth-preprocess-") as folder:
        summary = write_preprocessed(result, folder)
        archive = shutil.make_archive(str(Path(folder).parent / Path(folder).name), "zip", folder)
    # New photos get their thumbnail here: a square around the face the checks found. Made before
    # the transaction, which holds SQLite's write lock.
    thumbnails = {
        photo.pk: thumbnail_jpeg(
            data, face=check.face.box if check.face is not None else None, aspect=1.0, turn=check.turn
        )
        for photo, (_name, data), check in zip(photos, inputs, result.checks)
        if not photo.thumbnail
    }
    new_thumbnails = []
    stored_zip = persona.preprocessed.name
    try:
        with transaction.atomic():
            for photo, decision, check in zip(photos, summary["photos"], result.checks):
                photo.status = Photo.Status.ACCEPTED if decision["accepted"] else Photo.Status.REJECTED
                photo.reason_code = decision["reason"] or ""
                reference = bool(result.reference and result.reference.name == str(photo.id))
                photo.analysis = {**decision, "reference": reference, "check": check.to_json()}
                photo.save(update_fields=["status", "reason_code", "analysis"])
                if photo.pk in thumbnails:
                    photo.thumbnail.save(f"{uuid.uuid4().hex}.jpg", ContentFile(thumbnails[photo.pk]), save=False)
                    new_thumbnails.append(photo.thumbnail)
                    # Only where none is set yet: an analysis running beside this one may have set
                    # it, and a file no row names would outlive "delete my data".
                    if not Photo.objects.filter(pk=photo.pk, thumbnail="").update(thumbnail=photo.thumbnail.name):
                        photo.thumbnail.delete(save=False)
            _replace_preprocessed(persona, archive)  # after the photos' writes, which take SQLite's lock
            # A stopped build of the old photos can never resume now: its checkpoints go. Robust,
            # like the old zip's delete: past the commit, only what was not committed is undone.
            transaction.on_commit(lambda: training_folders.discard(persona.pk), robust=True)
    except Exception:
        # Their rows were not written: the new thumbnails, and the new zip if one was stored.
        new_zip = [persona.preprocessed] if persona.preprocessed.name != stored_zip else []
        _delete_stored(*new_thumbnails, *new_zip)
        raise
    finally:
        os.unlink(archive)
    return result


def _replace_preprocessed(persona: Persona, archive: str | None) -> None:
    """Stores the persona's new preprocessed zip (None: no zip) in the running transaction; the one
    it replaces goes after commit. That one's name is read under a lock, not from `persona`: an
    analysis beside this one may have stored another, and a zip no row names would outlive
    "delete my data"."""
    old = Persona.objects.select_for_update().values_list("preprocessed", flat=True).get(pk=persona.pk)
    if archive is None:
        persona.preprocessed = ""
    else:
        with open(archive, "rb") as zipped:
            persona.preprocessed.save(f"preprocessed-{persona.id}.zip", File(zipped), save=False)
    persona.save(update_fields=["preprocessed"])
    if old:
        transaction.on_commit(lambda: default_storage.delete(old), robust=True)


def _stored_cuts(persona: Persona) -> CutOuts | None:
    """The last analysis's training images by photo id, from the stored folder; None if unreadable
    (they are then cut again)."""
    if not persona.preprocessed:
        return None
    try:
        with persona.preprocessed.open("rb") as stored, zipfile.ZipFile(stored) as archive:
            record = json.loads(archive.read("persona.json"))
            images = {}
            for item in record["train"]:
                with archive.open(item["image"]) as image:
                    images[item["name"]] = Image.open(image).convert("RGB")
            return CutOuts(record.get("cut_key", ""), images)
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        log.warning("the stored training images of persona %s are unreadable; cutting them again", persona.pk)
        return None


def _stored_check(photo: Photo) -> PhotoCheck | None:
    """The face checks' findings kept on a photo; None (analyse it again) if absent or unreadable."""
    try:
        return PhotoCheck.from_json(photo.analysis["check"])
    except (KeyError, TypeError, ValueError):
        return None


def _check_photos_can_change(persona: Persona) -> None:
    """A double's photos are fixed from the moment it is queued for building."""
    if persona.status not in RETRYABLE_PERSONA:
        raise NotAllowed(_("The photos of this double cannot change while it is being built or once it is ready."))


def delete_photo(photo: Photo) -> None:
    """Deletes a photo and analyses the rest again; a ready double's kept original just goes
    (the double keeps the crops it was built from)."""
    persona = photo.persona
    if persona.status == Persona.Status.READY:
        photo.delete()
        return
    _check_photos_can_change(persona)
    photo.delete()
    _analyse_what_is_left(persona)


# The reason code of photos that show one of several people (pipeline.preprocess.select_person):
# nothing is built until the person says who the double is.
SEVERAL_PEOPLE = "several_people"


def delete_refused_photos(persona: Persona) -> None:
    """Deletes all of a double's refused photos at once: they fill its room of 20 until deleted.
    Photos of several people are not among them: the person chooses between them (choose_person)."""
    _check_photos_can_change(persona)
    refused = list(persona.photos.filter(status=Photo.Status.REJECTED).exclude(reason_code=SEVERAL_PEOPLE))
    if not refused:  # a second click, or an older tab: nothing changed, nothing to analyse
        return
    for photo in refused:
        photo.delete()
    _analyse_what_is_left(persona)


def photo_groups(photos: Sequence[Photo]) -> list[list[Photo]]:
    """The photos of each person, in the analysis's order, when they show several people; else []."""
    groups: dict[int, list[Photo]] = {}
    for photo in photos:
        if photo.reason_code == SEVERAL_PEOPLE and isinstance(photo.analysis.get("person"), int):
            groups.setdefault(photo.analysis["person"], []).append(photo)
    return [groups[number] for number in sorted(groups)]


def choose_person(persona: Persona, keep: Collection[int]) -> None:
    """The person says who the double is when its photos show several people: the other people's
    photos are deleted (a second person's photos are never used) and those left analysed again.

    `keep` is the chosen group's photo ids as the page showed them; when the groups changed since
    (an upload or delete in another tab), nothing is deleted and the person chooses again.
    """
    _check_photos_can_change(persona)
    chosen = set(keep)
    groups = photo_groups(list(persona.photos.all()))
    if not any({photo.id for photo in group} == chosen for group in groups):
        raise NotAllowed(_("The photos changed since this page was shown. Please choose again."))
    for group in groups:
        if {photo.id for photo in group} != chosen:
            for photo in group:
                photo.delete()
    _analyse_what_is_left(persona)


def _analyse_what_is_left(persona: Persona) -> None:
    """After photos were deleted: analyses those left, or drops the analysis when none are."""
    if persona.photos.exists():
        analyse_persona(persona)
        return
    with transaction.atomic():
        _replace_preprocessed(persona, None)
    training_folders.discard(persona.pk)


# --- Jobs: requests, fair dispatch, cancel, recovery -------------------------------------

JOB_FUNCTIONS = {Job.Kind.TRAIN: "studio.jobs.build_double", Job.Kind.GENERATE: "studio.jobs.make_portraits"}


def job_timeout_s(kind: str) -> int:
    """Training may take the gpu queue's whole limit; a portrait request far less."""
    return settings.GPU_JOB_TIMEOUT_S if kind == Job.Kind.TRAIN else settings.PORTRAIT_JOB_TIMEOUT_S


RETRYABLE_PERSONA = (Persona.Status.DRAFT, Persona.Status.FAILED, Persona.Status.CANCELLED)


class NotAllowed(Exception):
    """An action the person cannot take now; the message says why, in their words."""


# Redis going away or not answering: weather, not a bug. Whatever needs it waits for the next
# try (a worker's maintenance round, the page's next poll) and the database keeps the truth.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


_redis_unreachable = False  # in this process, since the last step that needed Redis: logged once


def _if_redis_answers(step: Callable[[], Any], what: str) -> bool:
    """Runs a step that needs Redis; False when Redis cannot be reached (logged once an outage)."""
    global _redis_unreachable
    try:
        step()
    except REDIS_DOWN as error:
        log.log(logging.DEBUG if _redis_unreachable else logging.WARNING,
                "Redis cannot be reached (%r): %s is left for later", error, what)
        _redis_unreachable = True
        return False
    if _redis_unreachable:
        log.warning("Redis answers again")
        _redis_unreachable = False
    return True


def _send(owner_id: int, template: str, context: dict) -> bool:
    """A fragment to the person's open pages, rendered in each of the site's languages: every
    page takes the one it is shown in (studio.consumers), whatever language the sender runs in.
    Live updates are best effort: without Redis the action still happens, and this says False."""
    html = {}
    for language, _name in settings.LANGUAGES:
        with translation.override(language):
            html[language] = render_to_string(template, context)
    send = async_to_sync(get_channel_layer().group_send)
    return _if_redis_answers(lambda: send(user_group(owner_id), {"type": "job.update", "html": html}), "a live update")


def publish_persona(persona: Persona) -> bool:
    """The new status wherever it is shown; the persona page then fetches what depends on it (site.js)."""
    return _send(persona.owner_id, "studio/_persona_status.html", {"persona": persona, "oob": True})


def set_persona_status(persona: Persona, status: str) -> None:
    persona.status = status
    persona.save(update_fields=["status"])
    publish_persona(persona)


def reset_persona_after_stop(job: Job, status: str) -> None:
    """A stopped build leaves the double in a state the person can retry from."""
    if job.kind == Job.Kind.TRAIN:
        set_persona_status(job.persona, status)


def _photos_refusal(persona: Persona) -> str | None:
    """Why the double cannot be built from its photos as they are; None when it can."""
    if persona.photos.filter(reason_code=SEVERAL_PEOPLE).exists():
        return _("These photos show more than one person. Choose who your double is before building it.")
    accepted = persona.photos.filter(status=Photo.Status.ACCEPTED).count()
    if accepted < settings.PHOTOS_NEEDED or not persona.preprocessed:
        needed = settings.PHOTOS_NEEDED
        return ngettext(
            "Add at least %(count)d good photo first.", "Add at least %(count)d good photos first.", needed
        ) % {"count": needed}
    return None


def request_training(persona: Persona, keep_photos: bool = False) -> Job:
    if (refusal := _photos_refusal(persona)) is not None:
        raise NotAllowed(refusal)
    # A build whose worker died is put back in line (or failed) first: never taken for the one asked.
    _if_redis_answers(lambda: recover_lost_jobs(Job.objects.filter(persona=persona)), "looking for lost jobs")
    with transaction.atomic():
        # Conditional, so a double-submitted form queues one build, not two.
        claimed = Persona.objects.filter(pk=persona.pk, status__in=RETRYABLE_PERSONA).update(
            status=Persona.Status.QUEUED, keep_photos=keep_photos
        )
        if not claimed:
            building = Job.objects.filter(persona=persona, kind=Job.Kind.TRAIN, status__in=Job.ACTIVE).first()
            if building and not building.cancel_requested:
                return building  # asked twice (a double click): the first request stands
            if building:
                raise NotAllowed(_("The last build of this double is still stopping. Try again in a moment."))
            raise NotAllowed(_("This double is already being built or is ready."))
        persona.status, persona.keep_photos = Persona.Status.QUEUED, keep_photos
        job = Job.objects.create(persona=persona, kind=Job.Kind.TRAIN)
        transaction.on_commit(dispatch_soon, robust=True)  # Redis down: it waits (dispatch_soon)
    return job


def request_portraits(persona: Persona, templates: list[Template]) -> Job:
    if persona.status != Persona.Status.READY:
        raise NotAllowed(_("This double is not ready yet."))
    if not templates:
        raise NotAllowed(_("Pick at least one template."))
    key = Job.templates_key_of(templates)
    # A request whose worker died is put back in line (or failed) first: never one to fold into.
    _if_redis_answers(lambda: recover_lost_jobs(Job.objects.filter(persona=persona)), "looking for lost jobs")
    try:
        return _ask_again_after_failure(persona, key) or _create_portrait_job(persona, templates, key)
    except IntegrityError:
        # The same request, waiting or running (a double click), stands. If it ended in between,
        # this one is asked once more; any other integrity error comes through.
        asked = Job.objects.filter(
            persona=persona, kind=Job.Kind.GENERATE, templates_key=key, status__in=Job.ACTIVE, cancel_requested=False
        ).first()
        return asked or _create_portrait_job(persona, templates, key)


def _ask_again_after_failure(persona: Persona, key: str) -> Job | None:
    """The same portraits asked for again after their job failed: that job goes back in line and
    renders only the templates it has no portrait of yet (its portraits are keyed by job and
    template), so trying again never puts a portrait in the album twice. None when the last job of
    this request did not fail."""
    last = Job.objects.filter(persona=persona, kind=Job.Kind.GENERATE, templates_key=key).order_by("-created").first()
    if last is None or last.status != Job.Status.FAILED:
        return None
    with transaction.atomic():
        if not _requeue_failed(last):
            return None
        transaction.on_commit(dispatch_soon, robust=True)  # Redis down: it waits (dispatch_soon)
    last.refresh_from_db()
    publish_job(last)
    return last


def _requeue_failed(job: Job) -> int:
    """Puts a failed job back in line as if new (its portraits stay: a run renders only what is
    missing); 0 when it is not failed any more (tried again meanwhile). Within a transaction that
    dispatches on commit. Raises IntegrityError when the same request waits or runs already
    (one_active_job_per_request)."""
    return Job.objects.filter(pk=job.pk, status=Job.Status.FAILED).update(
        status=Job.Status.QUEUED, rq_job_id="", worker="", progress=0.0, stage="", attempts=0, lost_workers=0,
        started=None, finished=None, heartbeat=None, error_for_person="", error_detail="", cancel_requested=False,
        dismissed_at=None,
    )


def _same_request_active(job: Job) -> Job | None:
    """Another job of the same request (the same build, or portraits of the same templates) that
    waits or runs and is not stopping: what stands when this one is asked for again."""
    return (
        Job.objects.filter(
            persona_id=job.persona_id, kind=job.kind, templates_key=job.templates_key,
            status__in=Job.ACTIVE, cancel_requested=False,
        )
        .exclude(pk=job.pk)
        .first()
    )


def _missing_templates(job: Job) -> QuerySet[Template]:
    """The templates of a portrait job that are still there (not deleted) and have no portrait of it yet."""
    return job.templates.filter(~Exists(Portrait.objects.filter(job=job, template=OuterRef("pk"))))


def retry_refusal(job: Job) -> str | None:
    """Why a failed job cannot be tried again, in the person's words; None when it can (its Retry
    button shows). It can when trying again answers it: the same request waiting or running
    already (retry_failed_job answers with that one), or a build of a double that can be built
    from its photos now, or portraits of a ready double with templates left to render (not all
    deleted, not all in the album already)."""
    if job.status != Job.Status.FAILED:
        return _("Only a job that failed can be tried again.")
    if _same_request_active(job) is not None:
        return None
    persona = job.persona
    if job.kind == Job.Kind.TRAIN:
        if persona.status not in RETRYABLE_PERSONA:
            if Job.objects.filter(persona=persona, kind=Job.Kind.TRAIN, status__in=Job.ACTIVE).exists():
                return _("The last build of this double is still stopping. Try again in a moment.")
            return _("This double is already being built or is ready.")
        return _photos_refusal(persona)
    if persona.status != Persona.Status.READY:
        return _("This double is not ready yet.")
    if not _missing_templates(job).exists():
        if job.templates.exists():
            return _("This job has already made every portrait it still can.")
        return _("The templates you chose were taken out of the gallery. Please choose others.")
    return None


class _Changed(Exception):
    """The job or its double changed between the checks and the update: look again."""


def retry_failed_job(job: Job) -> Job:
    """Tries a failed job again: the same row goes back in line (waiting, its error cleared) and is
    dispatched as a new job is. Its results are keyed by job, so portraits render only the
    templates it has no portrait of yet, and a build resumes from its double's last checkpoint.

    Returns the job that answers the request: this one, or the same request already waiting or
    running (a double click, another tab, the same thing asked for again), which then stands and
    this failure is put away. NotAllowed (retry_refusal) says why it cannot be tried again.
    """
    # A job whose worker died is put back in line (or failed) first: never one to answer with.
    _if_redis_answers(lambda: recover_lost_jobs(Job.objects.filter(persona_id=job.persona_id)), "looking for lost jobs")
    for _attempt in range(2):  # once more when it changed under our feet
        job.refresh_from_db()
        if job.is_active and not job.cancel_requested:
            return job  # tried again twice (a double click): the first try stands
        if (standing := _same_request_active(job)) is not None:
            dismiss_job(job)
            return standing
        if (refusal := retry_refusal(job)) is not None:
            raise NotAllowed(refusal)
        try:
            with transaction.atomic():
                if not _requeue_failed(job):
                    raise _Changed()
                if job.kind == Job.Kind.TRAIN and not Persona.objects.filter(
                    pk=job.persona_id, status__in=RETRYABLE_PERSONA
                ).update(status=Persona.Status.QUEUED):
                    raise _Changed()  # a build started meanwhile, or the double was built
                transaction.on_commit(dispatch_soon, robust=True)  # Redis down: it waits (dispatch_soon)
        except (_Changed, IntegrityError):  # the same request was made meanwhile
            continue
        job.refresh_from_db()
        if job.kind == Job.Kind.TRAIN:
            job.persona.refresh_from_db()
            publish_persona(job.persona)
        publish_job(job)
        return job
    raise NotAllowed(_("This job changed while you asked. Please reload the page."))


def dismiss_job(job: Job) -> bool:
    """Puts a failure away from the person's jobs panel (on all their pages) without trying it
    again. False when the job is not failed (tried again meanwhile, say): nothing changes."""
    Job.objects.filter(pk=job.pk, status=Job.Status.FAILED, dismissed_at__isnull=True).update(
        dismissed_at=timezone.now()
    )
    job.refresh_from_db()
    put_away = job.status == Job.Status.FAILED and job.dismissed_at is not None
    if put_away:
        publish_job(job)
    return put_away


def _create_portrait_job(persona: Persona, templates: list[Template], key: str) -> Job:
    with transaction.atomic():
        job = Job.objects.create(persona=persona, kind=Job.Kind.GENERATE, templates_key=key)
        job.templates.set(templates)
        transaction.on_commit(dispatch_soon, robust=True)  # Redis down: it waits (dispatch_soon)
    return job


def dispatch_waiting_jobs() -> None:
    """Puts each person's oldest waiting job on the gpu queue, one job per person at a time.

    So one person's ten jobs do not hold back another person's first: the others wait in the
    database and join the back of the queue as that person's previous job ends.
    """
    with _dispatch_lock():
        busy = set(
            Job.objects.filter(status__in=Job.ACTIVE).exclude(rq_job_id="").values_list("owner_id", flat=True)
        )
        waiting = Job.objects.filter(status=Job.Status.QUEUED, rq_job_id="").order_by("created", "id")
        for job in waiting:
            if job.owner_id in busy:
                continue
            busy.add(job.owner_id)
            rq_job_id = f"photobooth-job-{job.id}-{uuid.uuid4().hex[:8]}"
            # Enqueue first: if Redis fails here, the job stays waiting instead of stuck.
            enqueue("gpu", JOB_FUNCTIONS[job.kind], job.id, job_id=rq_job_id, timeout_s=job_timeout_s(job.kind))
            Job.objects.filter(pk=job.pk).update(rq_job_id=rq_job_id)


def dispatch_soon() -> bool:
    """dispatch_waiting_jobs, unless Redis cannot be reached: the jobs wait in the database, and the
    next worker maintenance round dispatches them (requeue_lost_jobs)."""
    return _if_redis_answers(dispatch_waiting_jobs, "dispatching waiting jobs")


def _dispatch_lock():
    """Held while jobs are put on the queue, so two processes never give one job two entries."""
    return django_rq.get_connection("gpu").lock("photobooth:dispatch", timeout=30, blocking_timeout=30)


# What RQ says of an entry that will never run its job (gone entirely: fetch_job gives None).
RQ_ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)


def requeue_lost_jobs() -> int:
    """Puts back in line the waiting jobs whose queue entry is gone, then dispatches waiting jobs.

    An entry goes when Redis restarts empty (`make run`'s keeps nothing on disk) or fails when
    its worker met an error before taking the job; its job would wait forever, and hold back
    every later job of its owner. Dispatching here too starts jobs asked for while Redis was
    down on a site where no request or job end would do it. Each worker maintenance round runs
    this.
    """
    queue = django_rq.get_queue("gpu")
    with _dispatch_lock():
        lost = [
            job
            for job in Job.objects.filter(status=Job.Status.QUEUED).exclude(rq_job_id="")
            if (entry := queue.fetch_job(job.rq_job_id)) is None or entry.get_status(refresh=False) in RQ_ENDED
        ]
        for job in lost:
            log.warning("job %s lost its queue entry %s; it goes back in line", job.pk, job.rq_job_id)
            Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED, rq_job_id=job.rq_job_id).update(rq_job_id="")
    dispatch_waiting_jobs()
    return len(lost)


def cancel_job(job: Job) -> bool:
    """A waiting job is removed at once; a running one stops at its next progress report.

    Returns False when Redis could not be reached: the job is cancelled all the same (the row is
    the truth; a worker that takes its old queue entry finds it cancelled), but the person's other
    pages hear of it only once live updates resume.
    """
    # Conditional updates: a worker may be starting the job at this very moment.
    stopped = Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED).update(
        status=Job.Status.CANCELLED, finished=timezone.now()
    )
    if stopped:
        live = not job.rq_job_id or _if_redis_answers(lambda: _cancel_queue_entry(job.rq_job_id), "a queue entry's cancel")
        job.refresh_from_db()
        reset_persona_after_stop(job, Persona.Status.CANCELLED)
        live = publish_job(job) and live
        return dispatch_soon() and live
    if Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(cancel_requested=True):
        job.refresh_from_db()
        return publish_job(job)  # every page of the person's says it is stopping, not only the one that asked
    return True


def _cancel_queue_entry(rq_job_id: str) -> None:
    rq_job = django_rq.get_queue("gpu").fetch_job(rq_job_id)
    if rq_job is not None:
        rq_job.cancel()


# --- Jobs: runs that end, runs that are lost -----------------------------------------------

# A worker (studio.worker) beats every WORKER_BEAT_S into its RQ registration, which Redis forgets
# WORKER_TTL_S after the last beat: then the worker is gone, and so is the run of its job.
WORKER_BEAT_S = 5
WORKER_TTL_S = 15
# A job whose worker died goes back in line this many times (its results are keyed, so a re-run
# does only what is missing); lost once more, it fails with words the person reads.
LOST_WORKER_REQUEUES = 1

WORKER_LOST = gettext_noop("The machine working on this stopped. Please try again.")


def end_run(job: Job, status: str, persona_status: str | None = None, **fields: Any) -> bool:
    """Records how a running job ended, then (a build) its double's state; False when this run no
    longer holds the row: the job was put back in line or ended meanwhile (its worker taken for
    lost, a cancel), or deleted. Only the run on `job.worker` may end it."""
    ended = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, worker=job.worker).update(
        status=status, finished=timezone.now(), **fields
    )
    if ended:
        job.refresh_from_db()
        if persona_status:
            reset_persona_after_stop(job, persona_status)
        publish_job(job)  # after its double's state: whether it can be tried again depends on it
    return bool(ended)


def put_back_in_line(job: Job, **counted: Any) -> bool:
    """Puts a running job back in line: it is dispatched again and does only what is missing.
    False when the person cancelled it meanwhile or this run no longer holds the row."""
    back = Job.objects.filter(
        pk=job.pk, status=Job.Status.RUNNING, worker=job.worker, cancel_requested=False
    ).update(status=Job.Status.QUEUED, rq_job_id="", worker="", progress=0.0, stage="", **counted)
    if back:
        job.refresh_from_db()
        publish_job(job)
        reset_persona_after_stop(job, Persona.Status.QUEUED)
    return bool(back)


def retry_job(job: Job) -> bool:
    """Puts a job that met a passing failure back in line (studio.jobs decides what passes);
    False when the person cancelled it meanwhile, so it stops instead."""
    return put_back_in_line(job, attempts=F("attempts") + 1)


def recover_lost_jobs(jobs: QuerySet[Job] | None = None) -> int:
    """Ends the runs of running jobs (all, or of `jobs`) whose worker is gone: killed, its machine
    lost, or exited without ending them. Returns how many.

    A worker's registration lives WORKER_TTL_S past its last beat, so a dead worker's job is found
    within that and the next look: any worker's maintenance round, a page that shows the job, the
    same thing asked for again. Nothing is judged while Redis has been up for less than WORKER_TTL_S:
    after a restart that lost the registrations, live workers register again at their next beat.
    """
    running = (jobs if jobs is not None else Job.objects.all()).filter(status=Job.Status.RUNNING).exclude(worker="")
    running = list(running.select_related("persona"))
    if not running:
        return 0
    connection = django_rq.get_connection("gpu")
    if connection.info("server")["uptime_in_seconds"] < WORKER_TTL_S:
        return 0
    names = sorted({job.worker for job in running})
    with connection.pipeline() as pipeline:
        for name in names:
            key = RQWorker.redis_worker_namespace_prefix + name
            pipeline.exists(key)
            pipeline.hexists(key, "death")  # exited: RQ keeps its record a minute
        answers = pipeline.execute()
    alive = {name for name, exists, died in zip(names, answers[::2], answers[1::2]) if exists and not died}
    lost = [job for job in running if job.worker not in alive]
    for job in lost:
        log.warning("job %s lost its worker %s", job.pk, job.worker)
        end_lost_run(job, f"Worker {job.worker} stopped beating (no registration in Redis).", count_as_lost=True)
    if lost:
        dispatch_waiting_jobs()
    return len(lost)


def end_lost_run(job: Job, why: str, count_as_lost: bool) -> None:
    """Ends the run of a job whose worker stopped: cancelled if the person asked; else back in line
    (a worker that shuts down, or the first worker lost); else failed, and the person reads why.
    RQ's registries then say the same (its entry moves from "started" to "failed")."""
    rq_job_id = job.rq_job_id
    if job.cancel_requested:
        end_run(job, Job.Status.CANCELLED, Persona.Status.CANCELLED)
    elif not count_as_lost:
        put_back_in_line(job)
    elif job.lost_workers < LOST_WORKER_REQUEUES:
        put_back_in_line(job, lost_workers=F("lost_workers") + 1)
    else:
        end_run(job, Job.Status.FAILED, Persona.Status.FAILED, error_for_person=WORKER_LOST, error_detail=why)
    if rq_job_id:
        _if_redis_answers(lambda: _fail_queue_entry(rq_job_id, why), "moving a lost job's queue entry")


def put_back_jobs_of_worker(worker: str, why: str) -> int:
    """The jobs a worker that is stopping right now still runs go back in line (a shutdown is no
    fault of theirs, and is not counted as a lost worker)."""
    running = list(Job.objects.filter(status=Job.Status.RUNNING, worker=worker).select_related("persona"))
    for job in running:
        end_lost_run(job, why, count_as_lost=False)
    if running:
        dispatch_soon()
    return len(running)


def _fail_queue_entry(rq_job_id: str, why: str) -> None:
    """Moves an RQ entry whose run the site ended from the started registry to the failed one, so
    the RQ dashboard agrees with the site at once (RQ itself notices after the job's timeout)."""
    queue = django_rq.get_queue("gpu")
    entry = queue.fetch_job(rq_job_id)
    if entry is None or entry.get_status(refresh=False) in RQ_ENDED:
        return
    with queue.connection.pipeline() as pipeline:
        for execution in entry.get_executions():
            queue.started_job_registry.remove_execution(execution, pipeline=pipeline)
        entry.set_status(JobStatus.FAILED, pipeline=pipeline)
        queue.failed_job_registry.add(entry, ttl=settings.JOB_FAILURE_TTL_S, exc_string=why, pipeline=pipeline)
        pipeline.execute()


def recover_abandoned_jobs() -> int:
    """Fails running jobs whose run stopped writing heartbeats for JOB_HEARTBEAT_TIMEOUT_S though its
    worker may still be registered (a hung process): the backstop of recover_lost_jobs."""
    limit = timezone.now() - timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT_S)
    abandoned = []
    for job in Job.objects.filter(status=Job.Status.RUNNING, heartbeat__lt=limit).select_related("persona"):
        why = f"No heartbeat since {job.heartbeat.isoformat()}; the worker was lost."
        failed = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, heartbeat__lt=limit).update(
            status=Job.Status.FAILED, finished=timezone.now(), error_for_person=WORKER_LOST, error_detail=why,
        )
        if failed:  # not finished or beating again in the meantime
            job.refresh_from_db()
            reset_persona_after_stop(job, Persona.Status.FAILED)
            publish_job(job)
            if job.rq_job_id:
                _if_redis_answers(lambda: _fail_queue_entry(job.rq_job_id, why), "moving a lost job's queue entry")
            abandoned.append(job)
    if abandoned:
        dispatch_soon()
    return len(abandoned)


def queue_position(job: Job) -> int | None:
    """How many jobs are ahead of this one on the gpu queue (None once it runs)."""
    if job.status != Job.Status.QUEUED:
        return None
    ahead = Job.objects.filter(status__in=Job.ACTIVE).exclude(rq_job_id="").filter(created__lt=job.created).count()
    return ahead


def estimated_seconds(job: Job, position: int | None) -> float | None:
    """From the durations of the last ten finished jobs of the same kind; `position` as queue_position."""
    recent = Job.objects.filter(kind=job.kind, status=Job.Status.SUCCEEDED, started__isnull=False).order_by("-finished")[:10]
    durations = [(done.finished - done.started).total_seconds() for done in recent]
    if not durations:
        return None
    typical = sum(durations) / len(durations)
    if position is None:
        return max(0.0, typical * (1.0 - job.progress))
    return typical * (position + 1)


# --- Templates and albums ----------------------------------------------------------------

THUMBNAIL_PX = 384  # long side of every thumbnail: photos, templates, portraits


def template_face_boxes(jpeg: bytes) -> list[list[float]]:
    """Face boxes of a template image, largest first; TemplateRefused says why none is usable."""
    return analyse_template(Image.open(io.BytesIO(jpeg)), face_analyzer()).boxes


def thumbnail_jpeg(
    data: bytes, size: int = THUMBNAIL_PX, face: Sequence[float] | None = None, aspect: float = 3 / 4, turn: int = 0
) -> bytes:
    """A small JPEG; with a face box, a cut of the card's shape (width / height = `aspect`: 3:4 in
    the gallery and album, square for photos) around the face: the cards' centred cut of a tall
    photo showed a torso without a head. `turn`: the quarter turns that set the photo upright (the
    face checks turn a photo whose face lies on its side; its box is in the turned photo)."""
    image = turned(Image.open(io.BytesIO(data)).convert("RGB"), turn)
    if face is not None:
        width = min(image.width, image.height * aspect)
        height = width / aspect
        x0, y0, x1, y1 = face
        left = min(max((x0 + x1) / 2 - width / 2, 0), image.width - width)
        top = min(max((y0 + y1) / 2 - 0.4 * height, 0), image.height - height)  # the face a little above the middle
        image = image.crop((round(left), round(top), round(left + width), round(top + height)))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def template_faces_note(template: Template) -> str:
    """For staff adding a template with several people: portraits replace only the largest face."""
    faces = len(template.face_boxes)
    if faces < 2:
        return ""
    return _("This template shows %(count)d faces. Portraits replace only the largest one; if that is not what "
             "you want, choose a photo of one person.") % {"count": faces}


def add_template(form, uploaded_by: AbstractBaseUser) -> Template:
    """Saves a valid TemplateForm: the re-encoded image, its face boxes and a thumbnail."""
    template = form.save(commit=False)
    _store_template(template, form.cleaned_jpeg, form.face_boxes, uploaded_by)
    return template


def create_template(
    title: str, tags: str, jpeg: bytes, uploaded_by: AbstractBaseUser, title_zh_hans: str = ""
) -> Template:
    """A published template from an image already known to be clean (the shipped demo ones)."""
    template = Template(title=title, title_zh_hans=title_zh_hans, tags=tags, published=True)
    _store_template(template, jpeg, template_face_boxes(jpeg), uploaded_by)
    return template


def _store_template(template: Template, jpeg: bytes, face_boxes: list, uploaded_by: AbstractBaseUser) -> None:
    """Saves the image and thumbnail under new names; a replaced pair is deleted after commit."""
    old_files = [] if template._state.adding else list(Template.objects.filter(pk=template.pk).values_list("image", "thumbnail")[0])
    transaction.on_commit(lambda: [default_storage.delete(name) for name in old_files if name])
    template.uploaded_by = uploaded_by
    template.face_boxes = face_boxes
    template.image.save(f"{uuid.uuid4().hex}.jpg", ContentFile(jpeg), save=False)
    thumbnail = thumbnail_jpeg(jpeg, face=face_boxes[0])
    template.thumbnail.save(f"{uuid.uuid4().hex}.jpg", ContentFile(thumbnail), save=False)
    template.save()


def album_archive(persona: Persona) -> io.BytesIO:
    """A zip of exactly this persona's portraits, built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for portrait in persona.portraits.select_related("persona", "template"):
            with portrait.image.open("rb") as image:
                archive.writestr(portrait.file_name, image.read())
    buffer.seek(0)
    return buffer


def lift_login_lockout(user: AbstractBaseUser) -> None:
    """Forgets the failed logins for this username, from any address: its password was just reset."""
    axes_reset(username=user.get_username())


def delete_all_data(owner: AbstractBaseUser, delete_account: bool) -> None:
    """Cancels the person's jobs, removes their queue entries, rows and files; optionally the account.

    Row deletes remove their files (studio.signals); the person's media folder is then
    removed whole, so nothing of theirs stays on disk.
    """
    folder = owner_folder(owner.pk)  # before owner.delete() clears the pk
    owner_id = owner.pk
    _remove_from_queue(Job.objects.filter(owner=owner))
    with transaction.atomic():
        Persona.objects.filter(owner=owner).delete()  # photos, jobs, portraits cascade
        FaceConsent.objects.filter(owner=owner).delete()
        if delete_account:
            AccessAttempt.objects.filter(username=owner.get_username()).delete()
            AccessLog.objects.filter(username=owner.get_username()).delete()
            owner.delete()
    _delete_folder(folder)
    discard_job_folders(owner_id)  # this machine's now; other workers' in their next maintenance round


def delete_persona(persona: Persona) -> None:
    """The double with its photos, jobs, portraits and all their files (studio.signals); its
    waiting jobs leave the queue, and the person's next job takes their turn.

    Refused while one of its jobs runs: the worker could be storing what it made at that moment.
    The job rows stay locked from that check to the delete, so a worker cannot start one in
    between (it finds the row gone, studio.jobs.run_job) nor store a portrait (save_portrait).
    """
    with transaction.atomic():
        jobs = list(Job.objects.select_for_update().filter(persona=persona))
        if any(job.status == Job.Status.RUNNING for job in jobs):
            raise NotAllowed(
                _("Something is being made from this double right now. Cancel it, or let it finish, then delete the double.")
            )
        _remove_from_queue(jobs)
        persona.delete()
        transaction.on_commit(dispatch_soon, robust=True)


def _remove_from_queue(jobs) -> None:
    """Takes the jobs' entries off the gpu queue; a started one stops by itself once its row is gone.
    Without Redis the entries stay: a worker that takes one finds no row and does nothing."""

    def remove() -> None:
        queue = django_rq.get_queue("gpu")
        for job in jobs:
            if job.rq_job_id:
                rq_job = queue.fetch_job(job.rq_job_id)
                if rq_job is not None and rq_job.get_status(refresh=False) != JobStatus.STARTED:
                    rq_job.delete()

    _if_redis_answers(remove, "removing queue entries")


def _delete_folder(folder: str) -> None:
    """Removes a storage folder and all below it (object stores have no folders to remove)."""
    try:
        shutil.rmtree(default_storage.path(folder), ignore_errors=True)
    except NotImplementedError:
        directories, files = default_storage.listdir(folder)
        for name in files:
            default_storage.delete(f"{folder}/{name}")
        for directory in directories:
            _delete_folder(f"{folder}/{directory}")


# --- Engines: what builds doubles and renders portraits on this worker -------------------

DEMO_TEMPLATES = Path(__file__).resolve().parent / "demo"


def diffusion_engine_or_classic() -> str:
    """"diffusion" when forced or when every model in MODEL_DIR is present, else "classic"."""
    if settings.PORTRAIT_ENGINE in ("classic", "diffusion"):
        return settings.PORTRAIT_ENGINE
    statuses = check_models(settings.MODEL_DIR, verify=False)
    return "diffusion" if statuses and all(status.ready for status in statuses) else "classic"


@functools.cache
def diffusion_engine() -> DiffusionEngine:
    """The resident diffusion models of this worker process (loaded on first use)."""
    return DiffusionEngine.from_models(load_models(settings.MODEL_DIR))


def forget_deleted_lora() -> None:
    """A worker keeps the last double's fused LoRA for its next portraits; once that double is
    deleted or rebuilt (its stored file is gone), the weights leave the worker's memory too.
    Never loads the engine: a worker that has not rendered holds nothing."""
    if diffusion_engine.cache_info().currsize == 0:
        return
    engine = diffusion_engine()
    if engine.lora is not None and not default_storage.exists(engine.lora.key[0]):
        log.info("forgetting the fused LoRA of a deleted double")
        engine.forget_lora()


@functools.cache
def validation_templates() -> tuple[ValidationTemplate, ...]:
    """The built-in validation templates: the demo portraits and their largest faces, each face
    blurred past recognition (pipeline.train.without_identity: they are famous people's)."""
    templates = []
    for path in sorted(DEMO_TEMPLATES.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        face = analyse_template(image, face_analyzer()).face
        template = ValidationTemplate(image, tuple(int(v) for v in face.box))
        templates.append(without_identity(template, TrainConfig().validation_mask_scale))
    return tuple(templates)


def train_double(
    persona: Persona, training_set: Path, progress: ProgressCallback, cancel: CancelToken
) -> tuple[dict[str, Path], float]:
    """Trains the persona LoRA from an unpacked preprocessed folder; returns files and score.

    It trains in the double's training folder (studio.training_folders), so a build that stopped
    resumes from its last checkpoint when the double is built again from the same photos.
    """
    photos, caption = read_preprocessed(training_set)
    config = TrainConfig(
        caption=caption, max_steps=settings.TRAIN_MAX_STEPS, checkpoint_every=settings.TRAIN_CHECKPOINT_EVERY
    )
    run = {
        "training_set": persona.preprocessed.name,  # a new name whenever the photos change
        "config": dataclasses.asdict(config),
        "face_models": face_analyzer().model_id,  # they score the validation faces
        "templates": sorted((path.name, path.stat().st_size) for path in DEMO_TEMPLATES.glob("*.jpg")),
    }
    digest = training_folders.fingerprint(run, Path(settings.MODEL_DIR))
    out_dir = training_folders.training_folder(persona.pk, digest, persona.preprocessed.name)
    result = train_persona(
        load_models(settings.MODEL_DIR), photos, out_dir,
        functools.partial(largest_face_embeddings, face_analyzer()), list(validation_templates()),
        config, progress=progress, cancel=cancel,
    )
    if result.resumed_from_step:
        log.info("double %s: training resumed from step %d of %d", persona.pk, result.resumed_from_step, result.steps)
    outputs = {
        "lora_file": result.lora_path,
        "best_face": result.best_face_path,
        "reference_face": training_set / "reference.png",
    }
    return outputs, result.best_score


def save_portrait(
    job: Job, template: Template, image: Image.Image, identity: float | None, held_out: float | None = None
) -> Portrait | None:
    """Stores a finished portrait and its thumbnail, once per job and template: None when a run of
    this job stored that template already (one_portrait_per_job_and_template).

    The files are written first, under new names that no row holds, and stay only when the row
    commits: whatever stops it (an error, a cancel, the worker's shutdown) removes them, and the
    files of a worker killed in between are named by no row, so sweep_orphan_files removes them.
    The job row is locked while the row is written: deleting the double waits (delete_persona),
    and a cancel, or the run being taken for lost (job.worker), stores nothing more.
    """
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=92)
    thumbnail = thumbnail_jpeg(out.getvalue(), face=template.face_boxes[0] if template.face_boxes else None)
    portrait = Portrait(
        persona=job.persona, template=template, job=job, identity_similarity=identity, held_out_similarity=held_out
    )
    try:
        portrait.image.save(f"{uuid.uuid4().hex}.jpg", ContentFile(out.getvalue()), save=False)
        portrait.thumbnail.save(f"{uuid.uuid4().hex}.jpg", ContentFile(thumbnail), save=False)
        with transaction.atomic():
            if not Job.objects.select_for_update().filter(pk=job.pk, cancel_requested=False, worker=job.worker).exists():
                raise Cancelled()  # cancelled, lost, or the person deleted the double or their data: write nothing
            portrait.save()
    except IntegrityError:
        _delete_stored(portrait.image, portrait.thumbnail)
        if Portrait.objects.filter(job=job, template=template).exists():
            return None  # an earlier run of this job stored it
        raise
    except BaseException:  # SystemExit too: no file outlives a row that was not written
        _delete_stored(portrait.image, portrait.thumbnail)
        raise
    return portrait


def publish_portrait(portrait: Portrait) -> None:
    """Adds the new portrait to the owner's open album page."""
    _send(portrait.owner_id, "studio/_portrait_new.html", {"portrait": portrait})


# --- What workers leave behind: temporary folders, orphan files --------------------------

def worker_folder(pid: int | None = None) -> Path:
    """The folder of one worker process (this one by default) for its jobs' temporary folders: face
    crops, embeddings and LoRA copies of the people whose jobs it runs."""
    return Path(tempfile.gettempdir()) / f"photobooth-worker-{pid or os.getpid()}"


def job_folder(job: Job, what: str) -> tempfile.TemporaryDirectory:
    """A temporary folder for one run of a job, removed when the run ends however it ends; named by
    its owner, so that "delete my data" finds it (discard_job_folders)."""
    root = worker_folder()
    root.mkdir(mode=0o700, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f"photobooth-{what}-u{job.owner_id}-j{job.pk}-", dir=root)


_WORKER_FOLDER = re.compile(r"^photobooth-worker-(\d+)$")


def _worker_folders() -> list[tuple[int, Path]]:
    root = Path(tempfile.gettempdir())
    return [(int(match.group(1)), path) for path in root.iterdir() if (match := _WORKER_FOLDER.match(path.name))]


def sweep_job_folders() -> int:
    """Removes what runs left in temporary folders on this machine; returns how many folders went.

    Called between jobs (a worker's maintenance round), so nothing in this process's own folder is
    in use; the whole folder of a worker process that no longer runs (killed, or stopped without
    cleaning up) goes too."""
    removed = 0
    for pid, folder in _worker_folders():
        if pid == os.getpid():
            for leftover in folder.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed += 1
        elif not _process_runs(pid):
            removed += sum(1 for _ in folder.iterdir())
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def discard_job_folders(owner_id: int) -> int:
    """Removes a person's job folders on this machine at once ("delete my data"); a run of theirs
    still going finds its row gone at its next step and stops."""
    removed = 0
    for _pid, folder in _worker_folders():
        for leftover in folder.glob(f"photobooth-*-u{owner_id}-j*"):
            shutil.rmtree(leftover, ignore_errors=True)
            removed += 1
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# Files no row names are kept this long: a run writes its files before their row commits (seconds).
ORPHAN_FILES_AFTER_S = 15 * 60


def sweep_orphan_files(older_than_s: float = ORPHAN_FILES_AFTER_S) -> int:
    """Removes the files in people's media folders that no row names, once older than
    `older_than_s`: left by a process killed between writing a file and committing its row, or a
    replaced file whose delete never ran. Returns how many."""
    removed = 0
    limit = timezone.now() - timedelta(seconds=older_than_s)
    try:
        owners, _files = default_storage.listdir("users")
    except FileNotFoundError:
        return 0
    for owner in owners:
        if not owner.isdecimal():
            continue
        named = _named_files(int(owner))
        for name in _stored_files(f"users/{owner}"):
            if name not in named and default_storage.get_modified_time(name) < limit:
                log.warning("removing %s: no row names it", name)
                default_storage.delete(name)
                removed += 1
    return removed


def _named_files(owner_id: int) -> set[str]:
    """Every file name the person's rows hold."""
    names = set()
    for model in (Photo, Persona, Portrait):
        fields = [field.name for field in model._meta.concrete_fields if isinstance(field, models.FileField)]
        for row in model.objects.filter(owner_id=owner_id).values_list(*fields):
            names.update(name for name in row if name)
    return names


def _stored_files(folder: str) -> list[str]:
    folders, files = default_storage.listdir(folder)
    found = [f"{folder}/{name}" for name in files]
    for below in folders:
        found += _stored_files(f"{folder}/{below}")
    return found
