"""The studio's actions. Views and jobs call these; nothing here reads a request."""

from __future__ import annotations

from typing import Any, Callable

import django_rq
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.template.loader import render_to_string
from rq.job import Job as RQJob

from studio.models import Job, Persona


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
