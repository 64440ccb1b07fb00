"""RQ job functions for tests only: the real portrait job (studio.jobs.make_portraits, so the real
run_job, job folder and failure handling) with a fault put where a real one would arise, in the
rendering (or a rendering that takes long). A real worker imports them by dotted path: it runs from the repository root, where
`tests` is a package.

Each records what the test cannot see from outside in a marker file in the worker's temporary
folder (TMPDIR): the job's folders when the rendering began and when the run recorded its end,
whether the CUDA cache was emptied. The fault is taken away again when the job ends, so the
worker's next job is an ordinary one.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from studio import jobs, services
from studio.models import Job


def marker(job_id: int, what: str, folder: Path | None = None) -> Path:
    """A file that the fault of job `job_id` writes in the worker's temporary folder (`folder`, the
    worker's TMPDIR, when asked from the test)."""
    return Path(folder or tempfile.gettempdir()) / f"photobooth-test-{what}-{job_id}.json"


def _record(job_id: int, what: str) -> None:
    """Writes the job's folder(s) as they are now, as marker `what`."""
    job = Job.objects.get(pk=job_id)
    folders = [str(path) for path in services.worker_folder().glob(f"photobooth-*-u{job.owner_id}-j{job.pk}-*")]
    marker(job_id, what).write_text(json.dumps({"folders": folders, "at": time.time()}))


def make_portraits_out_of_memory(job_id: int) -> None:
    """The portrait job, whose rendering runs out of GPU memory as torch says it (on any machine)."""

    def render_portraits(*args, **kwargs):
        _record(job_id, "rendering")
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 23.65 GiB (test fault)"
        )

    empty_cache = torch.cuda.empty_cache

    def emptied() -> None:
        _record(job_id, "cache-emptied")
        empty_cache()

    _with_faults(job_id, render_portraits, emptied)


def make_portraits_slowly(job_id: int) -> None:
    """The portrait job, whose rendering takes far longer than any test's timeout."""

    def render_portraits(*args, **kwargs):
        _record(job_id, "rendering")
        time.sleep(600)
        raise AssertionError("the job's timeout did not stop it")

    _with_faults(job_id, render_portraits, torch.cuda.empty_cache)


def make_portraits_with_a_long_second_batch(job_id: int) -> None:
    """The portrait job, whose second batch renders for long (a batch of big portraits on a slow
    machine, made certain): once the first batch is stored, marker "rendering" is written and the
    rendering of the second waits 120 s before it begins."""
    render, batches = jobs.render_portraits, []

    def render_portraits(*args, **kwargs):
        batches.append(len(batches) + 1)
        if len(batches) == 2:
            _record(job_id, "rendering")
            time.sleep(120)
        return render(*args, **kwargs)

    _with_faults(job_id, render_portraits, torch.cuda.empty_cache)


def _with_faults(job_id: int, render_portraits, empty_cache) -> None:
    """Runs the portrait job with these in place; records its folders as the run records its end
    (marker "ended"): a worker's maintenance round, right after a long job, would sweep them anyway."""
    render, empty, end_run = jobs.render_portraits, torch.cuda.empty_cache, services.end_run

    def ended(job, *args, **kwargs):
        _record(job_id, "ended")
        return end_run(job, *args, **kwargs)

    jobs.render_portraits, torch.cuda.empty_cache, services.end_run = render_portraits, empty_cache, ended
    try:
        jobs.make_portraits(job_id)
    finally:
        jobs.render_portraits, torch.cuda.empty_cache, services.end_run = render, empty, end_run
