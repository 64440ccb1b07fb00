"""RQ entry points for the GPU work: build a digital double, make portraits.

Each entry point loads its rows, runs the pipeline with progress and cancel wired to the
`Job` row (see `JobReporter`), writes artefacts atomically (work in a temporary folder of the
worker's, then store under new names and delete the old ones after commit, so running a job twice
leaves one set of files), and publishes every change to the owner's open pages. Training works in
the double's training folder instead, kept until the double is stored so a stopped build resumes
(studio.training_folders).

RQ runs a job at least once: a lost worker, a shutdown or a passing failure puts it back in line.
Results are keyed by what they answer (a portrait by its job and template), so a run does only
what is missing, and only the run that holds the row (`Job.worker`) may record how it ended.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import threading
import time
import traceback
import zipfile
from pathlib import Path
from typing import Callable

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone
from PIL import Image
import redis
import rq
from rq.timeouts import JobTimeoutException

from pipeline.common import CancelToken, Cancelled, Progress, gettext_noop
from pipeline.generate import GenerateConfig, LoraSource, analyse_template, load_persona, render_portraits
from studio import services, training_folders
from studio.models import Job, Persona, Photo, Portrait

log = logging.getLogger(__name__)

# What a person reads when a job fails (translated when shown); staff get the traceback.
FAILED_OUT_OF_MEMORY = gettext_noop(
    "The graphics card ran out of memory while working on this. Please try again in a few minutes."
)
# RQ's timeout (studio.services.job_timeout_s) stopped the job: the worker goes on to the next one.
FAILED_TIMED_OUT = gettext_noop(
    "This took longer than the time allowed and was stopped. Please try again; if it happens again, tell us."
)
FAILED_UNEXPECTEDLY = gettext_noop("Something went wrong on our side. You can try again; our staff can see what happened.")
TEMPLATES_GONE = gettext_noop(
    "The templates you chose were taken out of the gallery before your portraits were made. Please choose others."
)


class CannotRun(Exception):
    """The job cannot be done as it was asked; the message (marked for translation) tells the person why."""


# Failures that say nothing about the job itself: the job goes back in line, MAX_RETRIES times.
TRANSIENT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError, InterfaceError)
MAX_RETRIES = 2

# Set by the worker on its first SIGTERM (studio.worker): the running job stops at its next step.
worker_stopping = threading.Event()


class WorkerStopping(Exception):
    """The worker is shutting down: the job goes back in line, keeping what it stored."""


class JobReporter:
    """The pipeline's progress callback and cancel token for one Job row.

    Saves and publishes at most every `interval_s` (and always at a stage's end), and reads
    the row's cancel flag at the same time, so a cancel from the page stops the pipeline at
    its next progress report.
    """

    def __init__(self, job: Job, interval_s: float = 0.5) -> None:
        self.job = job
        self.cancel = CancelToken()
        self.interval_s = interval_s
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s and progress.fraction < 1.0:
            return
        self._last = now
        self.job.stage = progress.stage[:40]
        self.job.progress = min(1.0, max(0.0, progress.fraction))
        ours = Job.objects.filter(pk=self.job.pk, status=Job.Status.RUNNING, worker=self.job.worker)
        if not ours.update(stage=self.job.stage, progress=self.job.progress):
            # Taken for lost and put back in line (or deleted): another run does the rest.
            self.cancel.cancel()
        elif ours.filter(cancel_requested=True).exists():
            self.job.cancel_requested = True  # the pages say it is stopping, not running
            self.cancel.cancel()  # cancelled from the page
            services.publish_job(self.job)
        else:
            services.publish_job(self.job)
        self.cancel.raise_if_cancelled()

    def stop_if_worker_stops(self) -> None:
        """Called between steps whose work would be lost if cut: a training step, a portrait batch."""
        if worker_stopping.is_set():
            raise WorkerStopping()


class Heartbeat(threading.Thread):
    """Marks the job alive (a third of JOB_HEARTBEAT_TIMEOUT_S apart) while its worker process lives.

    Independent of progress reports, so a long silent step (loading models) is not taken for a
    lost worker; a killed worker stops beating and studio.services.recover_abandoned_jobs fails
    its job.
    """

    def __init__(self, job_id: int) -> None:
        super().__init__(daemon=True, name=f"heartbeat-job-{job_id}")
        self.job_id = job_id
        self.interval_s = settings.JOB_HEARTBEAT_TIMEOUT_S / 3
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.wait(self.interval_s):
                try:
                    Job.objects.filter(pk=self.job_id).update(heartbeat=timezone.now())
                except (OperationalError, InterfaceError):  # SQLite busy, a lost connection: the next beat
                    log.warning("job %s: a heartbeat was not written", self.job_id, exc_info=True)
        finally:
            connection.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=5)


def _worker_name() -> str:
    """The RQ worker running this job ("" when called outside one, as the tests do)."""
    current = rq.get_current_job()
    return (current.worker_name or "") if current is not None else ""


def run_job(job_id: int, work: Callable[[Job, JobReporter], None]) -> None:
    """Runs `work` for a queued Job and records how it ended; then dispatches the next job.

    Every way out leaves the row true: done, cancelled, failed in words, or back in line (a
    shutdown, a passing failure, SystemExit from a worker that is not ours).
    """
    started = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(
        status=Job.Status.RUNNING, started=timezone.now(), heartbeat=timezone.now(), worker=_worker_name()
    )
    if not started:
        return  # deleted or cancelled while it waited
    job = Job.objects.select_related("persona").get(pk=job_id)
    services.publish_job(job)
    heartbeat = Heartbeat(job.pk)
    heartbeat.start()
    try:
        work(job, JobReporter(job))
    except Cancelled:
        if not Job.objects.filter(pk=job.pk).exists():
            # The person deleted their data: nothing of theirs may be written again, and what a
            # build was still writing into its training folder goes too.
            training_folders.discard(job.persona_id)
            return
        services.end_run(job, Job.Status.CANCELLED, Persona.Status.CANCELLED)
    except WorkerStopping:
        log.info("job %s goes back in line: its worker is stopping", job.pk)
        _back_in_line_unless_cancelled(job)
    except TRANSIENT_ERRORS as error:
        if job.attempts >= MAX_RETRIES:
            _fail(job, error)
            raise
        if not services.retry_job(job):  # cancelled meanwhile: it stops here rather than wait again
            services.end_run(job, Job.Status.CANCELLED, Persona.Status.CANCELLED)
            return
        log.warning("job %s met a passing failure (%r); it goes back in line", job.pk, error)
        raise  # RQ keeps this attempt's traceback
    except Exception as error:
        _fail(job, error)
        raise  # RQ keeps the traceback in its failed registry for staff
    except BaseException:
        # SystemExit or KeyboardInterrupt raised wherever the job was (a plain RQ worker's cold
        # shutdown; ours stops in studio.worker): the row must not stay "running".
        _back_in_line_unless_cancelled(job)
        raise
    else:
        services.end_run(job, Job.Status.SUCCEEDED, progress=1.0)
    finally:
        heartbeat.stop()
        services.dispatch_soon()


def _back_in_line_unless_cancelled(job: Job) -> None:
    if not services.put_back_in_line(job):
        services.end_run(job, Job.Status.CANCELLED, Persona.Status.CANCELLED)


def _fail(job: Job, error: Exception) -> None:
    """The job's end first, then its double's (end_run): a build asked for once the double can be
    built again never meets this one still counted as running (one_active_job_per_request)."""
    log.exception("job %s failed", job.pk)
    if isinstance(error, CannotRun):
        message = str(error)
    elif isinstance(error, JobTimeoutException):  # raised by RQ's alarm wherever the job was
        message = FAILED_TIMED_OUT
    else:
        message = FAILED_OUT_OF_MEMORY if _is_out_of_memory(error) else FAILED_UNEXPECTEDLY
    services.end_run(
        job, Job.Status.FAILED, Persona.Status.FAILED, error_for_person=message, error_detail=traceback.format_exc()
    )


def _is_out_of_memory(error: Exception) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()  # the worker goes on serving
        return True
    return False


def unpack_preprocessed(persona: Persona, folder: Path) -> dict:
    """The persona's preprocessed folder (see pipeline.preprocess), unzipped; returns persona.json."""
    with persona.preprocessed.open("rb") as stored, zipfile.ZipFile(stored) as archive:
        archive.extractall(folder)
    return json.loads((folder / "persona.json").read_text(encoding="utf-8"))


def build_double(job_id: int) -> None:
    run_job(job_id, _build_double)


def _build_double(job: Job, report: JobReporter) -> None:
    persona = job.persona
    services.set_persona_status(persona, Persona.Status.PREPROCESSING)

    def progress(update: Progress) -> None:
        if update.stage == "validating" and persona.status != Persona.Status.VALIDATING:
            services.set_persona_status(persona, Persona.Status.VALIDATING)
        report(update)
        try:
            report.stop_if_worker_stops()  # the next build resumes from this step (pipeline.train)
        except WorkerStopping:
            log.info("double %s: the build stops at %s (%s)", persona.pk, update.stage, update.detail)
            raise

    with services.job_folder(job, "double") as work:
        folder = Path(work)
        summary = unpack_preprocessed(persona, folder)
        report(Progress("preprocess", 1.0))
        engine = services.diffusion_engine_or_classic()
        if engine == "classic":
            # No diffusion weights: the double is the selected, aligned faces and embeddings.
            scores = [photo["scores"]["similarity"] for photo in summary["photos"] if photo["accepted"]]
            outputs = {"reference_face": folder / "reference.png"}
            identity = sum(scores) / len(scores)
        else:
            services.set_persona_status(persona, Persona.Status.TRAINING)
            outputs, identity = services.train_double(persona, folder, progress, report.cancel)
        with transaction.atomic():
            # Locks the job row: a cancel or a "delete my data" either happened (nothing is
            # written) or waits until this double is stored.
            if not Job.objects.select_for_update().filter(pk=job.pk, cancel_requested=False, worker=job.worker).exists():
                raise Cancelled()
            old_files = [getattr(persona, field).name for field in outputs if getattr(persona, field)]
            for field, path in outputs.items():
                with open(path, "rb") as data:
                    getattr(persona, field).save(path.name, File(data), save=False)
            persona.engine, persona.identity_score, persona.status = engine, identity, Persona.Status.READY
            # update_fields: raises rather than re-inserting a row deleted meanwhile.
            persona.save(update_fields=[*outputs, "engine", "identity_score", "status"])
            transaction.on_commit(lambda: [default_storage.delete(name) for name in old_files])
            transaction.on_commit(lambda: training_folders.discard(persona.pk))  # stored: no resuming
            # The raw selfies go unless the person keeps them; refused ones go either way: the
            # double was not built from them, and they are biometric data all the same.
            leaving = Photo.objects.filter(persona=persona)
            if persona.keep_photos:
                leaving = leaving.exclude(status=Photo.Status.ACCEPTED)
            for photo in leaving:
                photo.delete()
    services.publish_persona(persona)


def make_portraits(job_id: int) -> None:
    run_job(job_id, _make_portraits)


def _copy_stored(stored, path: Path) -> Path:
    with stored.open("rb") as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
    return path


def _make_portraits(job: Job, report: JobReporter) -> None:
    templates = list(job.templates.all())
    if not templates:  # staff deleted them while the job waited
        raise CannotRun(TEMPLATES_GONE)
    # A run after another (a lost worker, a shutdown, asked again after a failure) renders only
    # the templates that have no portrait yet.
    done = set(Portrait.objects.filter(job=job).values_list("template_id", flat=True))
    templates = [template for template in templates if template.pk not in done]
    if not templates:
        return
    persona = job.persona
    analyzer = services.face_analyzer()
    with services.job_folder(job, "portraits") as work:
        folder = Path(work)
        unpack_preprocessed(persona, folder)
        engine = lora = None
        if persona.engine == "diffusion":
            _copy_stored(persona.best_face, folder / "best_face.png")
            # Copied out of storage only if this worker's engine does not hold it fused already.
            lora = LoraSource(persona.lora_file.name, functools.partial(
                _copy_stored, persona.lora_file, folder / "persona_lora.safetensors"
            ))
            engine = services.diffusion_engine()
        subject = load_persona(folder, analyzer)
        batches = [templates[start : start + PORTRAIT_BATCH] for start in range(0, len(templates), PORTRAIT_BATCH)]
        for index, batch in enumerate(batches):
            report.stop_if_worker_stops()  # the batch before is stored; the rest goes back in line
            faces = []
            for template in batch:
                with template.image.open("rb") as stored:
                    faces.append(
                        analyse_template(Image.open(stored), analyzer, template.prompt, template.negative_prompt)
                    )
            # Each portrait its own noise, seeded by the job and the template's place in it: asking
            # again for the same template gives another take, not a copy, and staff can redo one.
            seed = job.pk * SEEDS_PER_JOB + index * PORTRAIT_BATCH
            config = GenerateConfig(crop_size=settings.PORTRAIT_SIZE, seed=seed)
            results = render_portraits(
                subject, faces, analyzer, config, engine=engine, lora=lora,
                progress=_within(report, index, len(batches)), cancel=report.cancel, swapper=services.face_swapper(),
            )
            for template, result in zip(batch, results):
                portrait = services.save_portrait(
                    job, template, result.image, result.identity_score, result.held_out_score
                )
                if portrait is not None:
                    services.publish_portrait(portrait)


# Templates rendered together: a GPU renders 4 in about the time of 1 (see bench/RESULTS.md).
PORTRAIT_BATCH = 4
SEEDS_PER_JOB = 10_000  # portrait seeds never repeat for jobs of fewer templates


def _within(report: JobReporter, index: int, count: int) -> Callable[[Progress], None]:
    """Maps one batch's progress into its share of the whole job."""

    def scaled(progress: Progress) -> None:
        report(Progress("portrait", (index + progress.fraction) / count, progress.detail))

    return scaled
