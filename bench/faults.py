"""Benchmark: jobs that survive faults (issue 26). Real worker processes (`manage.py rqworker gpu
default`) and a real redis-server, killed and stopped while a portrait request runs (classic engine).

Run from the repository root: `python bench/faults.py [--smoke] [--templates N]`.

One SQLite database, one double, one redis-server; each scenario asks for N new templates:
1. kill: two workers; the one running the request is killed (SIGKILL) once its first batch is
   stored. detect_s: from the kill to the job put back in line; requeue_s: to the job running on
   the other worker; healthz_s: to /healthz counting one worker; done_s: to the job done.
2. sigterm: one worker, one SIGTERM while its second batch renders: exit_s, the row's state and the
   portraits kept; then a new worker finishes the request.
3. sigterm2: the same with a second SIGTERM 1.2 s after the first: exit_s after the second.
4. redis: Redis stopped for 10 s while a request runs; the pages, a cancel and a new socket asked
   every 0.5 s meanwhile. back_s: from Redis back to /healthz true (the worker registered again).
Each scenario also counts duplicate portraits and files no row names (before any sweep); the run,
the workers' temporary folders left once all is over.

Goals: a lost worker noticed <= 30 s; 0 duplicate portraits; 0 orphan files or temporary folders;
0 x 5xx during the outage (/healthz's own 503 aside); every worker still serving after it. The last
line holds the figures. `--smoke`: the kill scenario on 8 templates, then a 3 s outage while the
worker waits for work (well under a minute).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FOLDER = Path(tempfile.mkdtemp(prefix="photobooth-bench-faults-"))
os.environ["DATA_DIR"] = str(FOLDER)
os.environ.pop("DATABASE_URL", None)  # SQLite in FOLDER
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "photobooth.settings")

from photobooth.dev import RedisServer, redis_server_binary  # noqa: E402

REDIS = RedisServer()
os.environ["REDIS_URL"] = REDIS.url

import django  # noqa: E402

django.setup()

import django_rq  # noqa: E402
from asgiref.sync import async_to_sync  # noqa: E402
from channels.testing import WebsocketCommunicator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.test import Client  # noqa: E402
from django.urls import reverse  # noqa: E402
from rq import Worker  # noqa: E402

from photobooth.asgi import application  # noqa: E402
from studio import jobs, services  # noqa: E402
from studio.worker import MAINTENANCE_INTERVAL_S  # noqa: E402
from studio.models import Job, Persona, Portrait  # noqa: E402
from tests.jobs_fixtures import demo_templates, persona_with_photos  # noqa: E402

PYTHON = sys.executable
TMP = FOLDER / "worker-tmp"
STARTED: list[subprocess.Popen] = []


def start_worker(**env: str) -> subprocess.Popen:
    log = open(FOLDER / f"worker-{len(STARTED)}.log", "wb")
    process = subprocess.Popen(
        [PYTHON, "manage.py", "rqworker", "gpu", "default"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{settings.DATABASES['default']['NAME']}", "TMPDIR": str(TMP), **env},
    )
    STARTED.append(process)
    return process


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def live_workers() -> list[Worker]:
    return Worker.all(queue=django_rq.get_queue("gpu"))


def row(job: Job) -> Job:
    return Job.objects.get(pk=job.pk)


def healthz(client: Client) -> dict:
    return client.get(reverse("healthz")).json()


def outcome(owner, job: Job, templates: int) -> dict:
    """Duplicate portraits, and the files in the person's folder that no row names."""
    stored = list(Portrait.objects.filter(job=job).values_list("template_id", flat=True))
    media = Path(settings.MEDIA_ROOT)
    on_disk = {p.relative_to(media).as_posix() for p in (media / "users" / str(owner.id)).rglob("*") if p.is_file()}
    return {
        "portraits": f"{len(set(stored))}/{templates}",
        "duplicates": len(stored) - len(set(stored)),
        "orphans": len(on_disk - services._named_files(owner.id)),
    }


def temp_folders_left() -> int:
    """Job folders under the workers' TMPDIR, and folders of workers that no longer run (a live
    worker's maintenance round sweeps those: waited for here)."""
    def left() -> list[Path]:
        running = {process.pid for process in STARTED if process.poll() is None} | {os.getpid()}
        job_folders = list(TMP.glob("photobooth-worker-*/*"))
        return job_folders + [f for f in TMP.glob("photobooth-worker-*") if int(f.name.rsplit("-", 1)[1]) not in running]

    deadline = time.monotonic() + 2 * MAINTENANCE_INTERVAL_S
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    return len(left())


def stop_all(processes: list[subprocess.Popen]) -> None:
    """As a deployment stops workers: SIGTERM, then SIGKILL after a grace."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# The scenarios.

def kill(owner, persona, client: Client, count: int, pair: list[subprocess.Popen]) -> tuple[dict, subprocess.Popen]:
    """Returns the scenario's row and the worker that survived."""
    templates = [t for _ in range(count // 4) for t in demo_templates(owner, 4)]
    wait_for(lambda: len(live_workers()) == 2, 120, "two workers")
    job = services.request_portraits(persona, templates)
    first = wait_for(lambda: row(job).worker, 60, "the job to start")
    wait_for(lambda: Portrait.objects.filter(job=job).count() >= jobs.PORTRAIT_BATCH, 120, "the first batch")
    (pid,) = [w.pid for w in live_workers() if w.name == first]
    (busy,) = [p for p in pair if p.pid == pid]
    busy.kill()
    busy.wait()
    killed = time.monotonic()
    figures: dict = {}
    while "done_s" not in figures and time.monotonic() - killed < 180:
        current, elapsed = row(job), time.monotonic() - killed
        if "detect_s" not in figures and (current.status != "running" or current.worker != first):
            figures["detect_s"] = elapsed
        if "requeue_s" not in figures and current.status == "running" and current.worker not in ("", first):
            figures["requeue_s"] = elapsed
        if "healthz_s" not in figures and healthz(client)["worker"].get("gpu_workers") == 1:
            figures["healthz_s"] = elapsed
        if current.status == "succeeded":
            figures["done_s"] = elapsed
        time.sleep(0.1)
    figures.setdefault("requeue_s", figures.get("done_s", float("nan")))  # done before it was seen running
    result = {"scenario": "kill", "state": row(job).status, "lost_workers": row(job).lost_workers, **figures,
              **outcome(owner, job, len(templates))}
    (survivor,) = [process for process in pair if process is not busy]
    return result, survivor


def sigterm(owner, persona, count: int, twice: bool) -> dict:
    templates = [t for _ in range(count // 4) for t in demo_templates(owner, 4)]
    # Larger portraits for the second signal: a batch takes seconds, so it arrives inside one.
    worker = start_worker(**({"PORTRAIT_SIZE": "768"} if twice else {}))
    job = services.request_portraits(persona, templates)
    wait_for(lambda: Portrait.objects.filter(job=job).count() >= jobs.PORTRAIT_BATCH, 180, "the first batch")
    worker.send_signal(signal.SIGTERM)
    if twice:
        time.sleep(1.2)  # RQ takes two signals within a second for one
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = worker.wait(timeout=60)
    exit_s = time.monotonic() - signalled
    stopped = row(job)
    kept = Portrait.objects.filter(job=job).count()
    result = {"scenario": "sigterm2" if twice else "sigterm", "exit_s": exit_s, "exit_code": code,
              "state_after": f"{stopped.status}{'@' + stopped.worker[:6] if stopped.worker else ''}", "kept": kept}
    finisher = start_worker()
    started = time.monotonic()
    wait_for(lambda: row(job).status == "succeeded", 180, "the next worker to finish")
    result.update(state=row(job).status, done_s=time.monotonic() - started, **outcome(owner, job, len(templates)))
    stop_all([finisher])
    return result


def socket_answers(client: Client) -> bool:
    """A new page socket is accepted or refused, never an error."""

    async def scenario():
        cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
        communicator = WebsocketCommunicator(application, "/ws/jobs/",
                                             headers=[(b"origin", b"http://localhost"), (b"cookie", cookie)])
        connected, _ = await communicator.connect(timeout=20)
        if connected:
            await communicator.receive_output(timeout=20)
        await communicator.disconnect()

    try:
        async_to_sync(scenario)()
        return True
    except Exception:  # noqa: BLE001  (an error is what is counted)
        return False


PAGES = ["home", "album", "gallery", "jobs_panel", "account"]


def redis_outage(owner, persona, client: Client, count: int, outage_s: float, worker: subprocess.Popen,
                 running: bool) -> dict:
    """`running`: a request runs through the outage (else the worker waits for work meanwhile)."""
    templates = [t for _ in range(count // 4) for t in demo_templates(owner, 4)]
    wait_for(lambda: len(live_workers()) == 1, 120, "one worker")
    job = services.request_portraits(persona, templates) if running else None
    if job:
        wait_for(lambda: Portrait.objects.filter(job=job).exists(), 120, "the first portraits")
    REDIS.process.terminate()
    REDIS.process.wait(timeout=10)
    answers, socket_errors = [], 0
    try:
        # Asked for and cancelled while Redis is down: the request waits in the database.
        asked = client.post(reverse("portraits_request"), {"persona": persona.pk, "templates": [templates[0].pk]})
        answers.append(asked.status_code)
        waiting = Job.objects.filter(persona=persona, templates__in=[templates[0]]).latest("created")
        answers.append(client.post(reverse("job_cancel", args=[waiting.pk]), headers={"HX-Request": "true"}).status_code)
        ends = time.monotonic() + outage_s
        while time.monotonic() < ends:
            answers += [client.get(reverse(page)).status_code for page in PAGES]
            socket_errors += not socket_answers(client)
            time.sleep(0.5)
        alive_during = worker.poll() is None
    finally:
        REDIS.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(REDIS.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", REDIS._folder.name], stdout=subprocess.DEVNULL,
        )
        REDIS._wait_until_ready()
    back = time.monotonic()
    wait_for(lambda: healthz(client)["ok"], 60, "/healthz true after Redis is back")
    back_s = time.monotonic() - back
    if job:
        wait_for(lambda: row(job).status == "succeeded", 180, "the job to finish")
    after = services.request_portraits(persona, demo_templates(owner, 1))
    serving = bool(wait_for(lambda: row(after).status == "succeeded", 120, "a job after the outage"))
    result = {"scenario": "redis", "outage_s": outage_s, "requests": len(answers),
              "errors_5xx": sum(code >= 500 for code in answers) + socket_errors,
              "cancelled": row(waiting).status == "cancelled", "back_s": back_s,
              "workers_alive": int(alive_during and serving and worker.poll() is None)}
    if job:
        result.update(state=row(job).status, **outcome(owner, job, len(templates)))
    return result


# The report.

def table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(column for row in rows for column in row))

    def cell(value) -> str:
        return f"{value:.1f}" if isinstance(value, float) else "" if value is None else str(value)

    widths = [max(len(column), *(len(cell(row.get(column))) for row in rows)) for column in columns]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row_ in rows:
        print("  ".join(cell(row_.get(column)).ljust(width) for column, width in zip(columns, widths)))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the kill scenario (8 templates) and a 3 s outage")
    parser.add_argument("--templates", type=int, default=12, help="templates per request (a multiple of 4)")
    args = parser.parse_args()
    count = 8 if args.smoke else max(8, args.templates // 4 * 4)
    print(f"faults: {count} templates per request (classic engine), SQLite, workers' TMPDIR {TMP}; "
          f"a worker's registration lives {services.WORKER_TTL_S} s past its last beat\n")
    rows = []
    try:
        call_command("migrate", verbosity=0)
        TMP.mkdir()
        tempfile.tempdir = str(TMP)  # this process's own runs (building the double) too
        owner = User.objects.create_user("bench", "bench@example.com", "bench-faults")
        client = Client(HTTP_HOST="localhost")
        client.force_login(owner)
        persona = persona_with_photos(owner)
        pair = [start_worker(), start_worker()]  # one of them builds the double
        services.request_training(persona)
        wait_for(lambda: Persona.objects.get(pk=persona.pk).status == Persona.Status.READY, 180, "the double")
        persona.refresh_from_db()
        killed, survivor = kill(owner, persona, client, count, pair)
        rows.append(killed)
        outage = redis_outage(owner, persona, client, count, 3.0 if args.smoke else 10.0, survivor, not args.smoke)
        if not args.smoke:
            stop_all([survivor])
            rows.append(sigterm(owner, persona, count, twice=False))
            rows.append(sigterm(owner, persona, count, twice=True))
        rows.append(outage)
        folders = temp_folders_left()
    finally:
        stop_all(STARTED)
        REDIS.stop()
        shutil.rmtree(FOLDER, ignore_errors=True)
    table(rows)
    print(f"temporary folders left on the workers once all is over: {folders}\n")
    killed, outage = rows[0], rows[-1]
    print(
        f"detect_s={killed['detect_s']:.1f} requeue_s={killed['requeue_s']:.1f} healthz_s={killed['healthz_s']:.1f}"
        f" duplicates={sum(r.get('duplicates', 0) for r in rows)} orphans={sum(r.get('orphans', 0) for r in rows)}"
        f" temp_folders={folders} errors_5xx={outage['errors_5xx']}"
        f" back_s={outage['back_s']:.1f} workers_alive={outage['workers_alive']}"
    )


if __name__ == "__main__":
    main()
