"""The studio's actions. Views and jobs call these; nothing here reads a request."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import django_rq
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.template.loader import render_to_string
from rq.job import Job as RQJob

from pipeline.faces import FaceAnalyzer, load_face_analyzer
from pipeline.preprocess import PreprocessResult, preprocess, write_preprocessed
from studio.models import FaceConsent, Job, Persona, Photo
from studio.uploads import Refusal, RefusedFile, clean_photo


def user_group(user_id: int) -> str:
    """The Channels group that carries one person's live updates, and only theirs."""
    return f"user-{user_id}"


def create_persona(owner: AbstractBaseUser, name: str) -> Persona:
    return Persona.objects.create(owner=owner, name=name.strip())


def active_jobs(owner: AbstractBaseUser) -> list[Job]:
    return list(Job.objects.filter(owner=owner, status__in=Job.ACTIVE).select_related("persona"))


def render_jobs_panel(owner: AbstractBaseUser) -> str:
    """The whole jobs panel as an out-of-band fragment: what a socket gets on connect."""
    return render_to_string("studio/_jobs.html", {"jobs": active_jobs(owner), "oob": True})


def publish_job(job: Job) -> None:
    """Sends the job's current state to its owner's open pages as an htmx OOB fragment."""
    html = render_to_string("studio/_job.html", {"job": job, "oob": True})
    async_to_sync(get_channel_layer().group_send)(user_group(job.owner_id), {"type": "job.update", "html": html})


def enqueue(queue_name: str, func: Callable[..., Any] | str, *args: Any, job_id: str | None = None) -> RQJob:
    """Puts work on an RQ queue with that queue's timeout and the failure TTL from settings."""
    queue = django_rq.get_queue(queue_name)
    return queue.enqueue(
        func,
        *args,
        job_id=job_id,
        job_timeout=settings.RQ_QUEUES[queue_name]["DEFAULT_TIMEOUT"],
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


def add_photos(persona: Persona, uploads: list[UploadedFile]) -> list[Refusal]:
    """Stores every upload that passes the file checks, then re-runs the persona's analysis.

    A refused file leaves no file and no row; the refusals come back for the page to show.
    """
    refusals: list[Refusal] = []
    stored = 0
    for upload in uploads:
        try:
            jpeg = clean_photo(upload)
        except RefusedFile as refused:
            refusals.append(Refusal(upload.name, str(refused.message)))
            continue
        photo = Photo(persona=persona)
        photo.image.save(f"{uuid.uuid4().hex}.jpg", ContentFile(jpeg), save=True)
        stored += 1
    if stored:
        analyse_persona(persona)
    return refusals


def analyse_persona(persona: Persona) -> PreprocessResult:
    """Runs face analysis and selection over all of the persona's photos and stores the result.

    Every photo gets its decision and scores; the preprocessed folder (crops, embeddings,
    reference face) is stored zipped on the persona, replacing the previous one.
    """
    photos = list(persona.photos.all())
    inputs = []
    for photo in photos:
        with photo.image.open("rb") as stored:
            inputs.append((str(photo.id), stored.read()))
    result = preprocess(inputs, face_analyzer())
    with tempfile.TemporaryDirectory(prefix="photobooth-preprocess-") as folder:
        summary = write_preprocessed(result, folder)
        archive = shutil.make_archive(str(Path(folder).parent / Path(folder).name), "zip", folder)
    try:
        with transaction.atomic():
            for photo, decision in zip(photos, summary["photos"]):
                photo.status = Photo.Status.ACCEPTED if decision["accepted"] else Photo.Status.REJECTED
                photo.reason_code = decision["reason"] or ""
                photo.analysis = {**decision, "reference": bool(result.reference and result.reference.name == str(photo.id))}
                photo.save(update_fields=["status", "reason_code", "analysis"])
            old = persona.preprocessed.name
            with open(archive, "rb") as zipped:
                persona.preprocessed.save(f"preprocessed-{persona.id}.zip", File(zipped), save=True)
            if old:
                transaction.on_commit(lambda: persona.preprocessed.storage.delete(old))
    finally:
        os.unlink(archive)
    return result


def delete_photo(photo: Photo) -> None:
    persona = photo.persona
    photo.delete()
    if persona.photos.exists():
        analyse_persona(persona)
    elif persona.preprocessed:
        persona.preprocessed.delete(save=True)
