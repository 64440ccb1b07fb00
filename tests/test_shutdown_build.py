"""One SIGTERM during a real build (issue 26): a worker process trains a double with the diffusion
engine on the tiny model kit, is stopped once a checkpoint is on disk, puts the build back in line
within seconds and exits, keeping the training state of the step it stopped at; the next worker
resumes from that step, so the stop lost no training.

Bounded: every wait has its limit, and the worker processes are killed when the test ends.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline.tinykit import build_tiny_kit
from studio import services
from studio.models import Job, Persona
from tests.jobs_fixtures import persona_with_photos
from tests.processes import output_of, start_worker, stop, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

STEPS, EVERY = 12, 3  # four checkpoints: the first is on disk well before the build ends
REQUEUED_WITHIN_S = 10  # "within a few seconds", with room for a busy 2-core machine
EXITED_WITHIN_S = 30


@pytest.fixture
def build_workers(tmp_path):
    """Starts real workers (manage.py rqworker) with the diffusion engine on a tiny kit; kills them
    at the end and prints their output (shown when the test fails)."""
    env = {
        "MODEL_DIR": str(build_tiny_kit(tmp_path / "models")),
        "PORTRAIT_ENGINE": "diffusion",
        "TRAIN_MAX_STEPS": str(STEPS),
        "TRAIN_CHECKPOINT_EVERY": str(EVERY),
        "PORTRAIT_SIZE": "64",
        "OMP_NUM_THREADS": "1",  # two torch threads on two busy cores make step times swing
        "TMPDIR": str(tmp_path / "worker-tmp"),
    }
    (tmp_path / "worker-tmp").mkdir()
    started = []

    def start():
        started.append(start_worker(**env))
        return started[-1]

    yield start
    for process in started:
        print(stop(process, kill=True)[-6000:])


def resume_step(folder: Path) -> int | None:
    """The step of the resume state (the last complete checkpoint, or the step a stopped run
    reached), None while there is none."""
    resume = folder / "resume.pt"
    if not resume.is_file():
        return None
    return int(torch.load(resume, map_location="cpu", weights_only=False)["step"])


def test_one_sigterm_during_a_build_keeps_its_training_and_the_next_worker_resumes_there(
    owner, build_workers, training_dir
):
    persona = persona_with_photos(owner)
    job = services.request_training(persona)
    started = time.monotonic()
    first = build_workers()

    # The first checkpoint is complete: the resume state is written last (pipeline.train).
    deadline = time.monotonic() + 120
    while not list(training_dir.glob("persona-*/resume.pt")):
        assert first.poll() is None, output_of(first)[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s:\n" + output_of(first)[-4000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    print(f"first checkpoint {signalled - started:.1f} s after the worker started; SIGTERM sent")

    row = wait_for(
        lambda: (row := Job.objects.get(pk=job.pk)).status != Job.Status.RUNNING and row,
        REQUEUED_WITHIN_S, "the build to leave 'running'",
    )
    requeued_s = time.monotonic() - signalled
    assert (row.status, row.worker, row.error_detail) == (Job.Status.QUEUED, "", "")
    assert first.wait(timeout=EXITED_WITHIN_S) == 0
    exited_s = time.monotonic() - signalled
    print(f"the build was back in line {requeued_s:.1f} s after SIGTERM; the worker exited after {exited_s:.1f} s")
    persona.refresh_from_db()
    assert persona.status == Persona.Status.QUEUED

    first_output = output_of(first)
    stopped = re.search(
        rf"double {persona.pk}: the build stops at (?:training|validating) \((?:step (\d+)/{STEPS}|checkpoint (\d+))",
        first_output,
    )
    assert stopped, first_output[-4000:]  # it stopped in training, at a progress report
    stopped_at = int(stopped.group(1) or stopped.group(2))
    (folder,) = training_dir.iterdir()
    kept = resume_step(folder)
    checkpoints = sorted(path.name for path in (folder / "checkpoints").iterdir())
    print(f"the first worker reported step {stopped_at} of {STEPS} last and kept step {kept}; checkpoints: {checkpoints}")
    # No training is lost: the state kept is at least as far as the last step the worker reported
    # (it stops at the next step's start), and past the last checkpoint when it stopped between two.
    assert kept is not None and EVERY <= stopped_at <= kept < STEPS
    assert checkpoints[-1] <= f"step-{kept:06d}"

    second = build_workers()
    resumed = time.monotonic()
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED, 120, "the next worker to finish the build")
    print(f"the next worker finished the build {time.monotonic() - resumed:.1f} s after it started")
    persona.refresh_from_db()
    assert persona.status == Persona.Status.READY and persona.engine == "diffusion"
    second_output = output_of(second)
    assert f"double {persona.pk}: training resumed from step {kept} of {STEPS}" in second_output, second_output[-4000:]
    assert not list(training_dir.iterdir())  # the double is stored: nothing left to resume
