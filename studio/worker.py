"""The RQ worker class for Photobooth (settings.RQ["WORKER_CLASS"]).

It does not fork (RQ's default forks per job): models loaded by one job stay resident for
the next, and a parent that touched CUDA never forks a CUDA child. Beyond RQ's worker:

- **Liveness.** A thread beats every `WORKER_BEAT_S` into the worker's RQ registration, which
  Redis forgets `WORKER_TTL_S` after the last beat (RQ let it live for the job's timeout + 60 s):
  a killed worker leaves `/healthz` and its job is found lost within seconds
  (studio.services.recover_lost_jobs). After a Redis restart the beat registers the worker again.
- **Maintenance** (each `MAINTENANCE_INTERVAL_S`): recovers lost jobs, puts back in line waiting
  jobs whose queue entry was lost and dispatches waiting jobs, removes the training folders that no
  build will resume (studio.training_folders) and what finished runs left in temporary folders,
  forgets the fused LoRA of a double deleted since its last portraits, and every
  `ORPHAN_SWEEP_EVERY_S` (one worker for all) removes media files that no row names.
- **Shutdown.** A first SIGTERM (or Ctrl-C) stops the running job at its next step and puts it
  back in line, then the worker exits; a second one puts the job back in line at once and exits
  within `COLD_STOP_S`, whatever the job was doing.
- **Redis outages** are waited out with backoff (at most `max_connection_wait_time` apart); RQ
  quit on most of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from datetime import timedelta

from rq import SimpleWorker, worker_registration
from rq.exceptions import StopRequested
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from studio import jobs, services, training_folders

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 10
# A second signal: the most the job's row may take to go back in line before the process exits.
COLD_STOP_S = 5
ORPHAN_SWEEP_EVERY_S = 600


class StudioWorker(SimpleWorker):
    max_connection_wait_time = 5.0  # Redis back: working again within 5 s (RQ waits up to 60 s)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        super().__init__(*args, **kwargs)
        self._in_maintenance = False
        self._beats_stopped = threading.Event()
        self._beats: threading.Thread | None = None

    @property
    def dequeue_timeout(self) -> int:
        """An idle worker wakes this often, so maintenance runs on time (RQ waits worker_ttl - 15 s)."""
        return MAINTENANCE_INTERVAL_S

    # --- Liveness -------------------------------------------------------------------------

    def bootstrap(self, *args, **kwargs) -> None:
        super().bootstrap(*args, **kwargs)
        self._beats = threading.Thread(target=self._beat_until_stopped, name="worker-beats", daemon=True)
        self._beats.start()

    def register_birth(self) -> None:
        super().register_birth()
        self.connection.expire(self.key, services.WORKER_TTL_S)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ's heartbeat, always with the short TTL: RQ asks for the job's timeout + 60 s when a job
        starts, which kept a worker killed during a job "alive" for half an hour."""
        try:
            super().heartbeat(services.WORKER_TTL_S, pipeline=pipeline)
        except services.REDIS_DOWN:
            pass  # the beats thread says so, and registers the worker again once Redis is back

    def _beat_until_stopped(self) -> None:
        reachable = True
        while not self._beats_stopped.wait(services.WORKER_BEAT_S):
            try:
                self._beat()
                if not reachable:
                    log.warning("Worker %s: Redis answers again", self.name)
                reachable = True
            except services.REDIS_DOWN as error:
                if reachable:
                    log.warning("Worker %s: Redis cannot be reached (%r); waiting for it", self.name, error)
                reachable = False
            except Exception:  # noqa: BLE001  (the beats must go on)
                log.exception("Worker %s: a beat failed", self.name)

    def _beat(self) -> None:
        with self.connection.pipeline() as pipeline:
            pipeline.hset(self.key, "last_heartbeat", utcformat(now()))
            pipeline.expire(self.key, services.WORKER_TTL_S)
            pipeline.hexists(self.key, "birth")
            pipeline.sismember(self.redis_workers_keys, self.key)
            *_beat, born, listed = pipeline.execute()
        if not (born and listed) and not self._beats_stopped.is_set():
            # Redis restarted without our registration (a heartbeat of RQ's may have made a bare
            # record since): /healthz and the lost-job check would take this worker for dead.
            log.warning("Worker %s: registering again (Redis lost the registration)", self.name)
            self.last_heartbeat = now()
            with self.connection.pipeline() as pipeline:
                pipeline.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
                worker_registration.register(self, pipeline)
                pipeline.expire(self.key, services.WORKER_TTL_S)
                pipeline.execute()

    def teardown(self) -> None:
        self._beats_stopped.set()
        if self._beats is not None:
            self._beats.join(timeout=2)
        shutil.rmtree(services.worker_folder(), ignore_errors=True)  # its runs are over
        try:
            super().teardown()
        except services.REDIS_DOWN:
            log.warning("Worker %s: Redis cannot be reached to record the exit; the registration expires", self.name)

    # --- Redis outages --------------------------------------------------------------------

    def set_state(self, state: str, pipeline=None) -> None:
        try:
            super().set_state(state, pipeline=pipeline)  # the state is kept in this process first
        except services.REDIS_DOWN:
            pass

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except services.REDIS_DOWN:
            pass  # no one can suspend workers without Redis either

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's, which waits out a refused connection, also waiting out one that stopped answering."""
        wait_s = 1.0
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except services.REDIS_DOWN as error:
                log.warning("Worker %s: Redis cannot be reached (%r); trying again in %.0f s", self.name, error, wait_s)
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, self.max_connection_wait_time)

    def execute_job(self, job, queue) -> None:
        """The job's row holds how it ended; RQ's record of it may be lost with Redis, not the worker."""
        try:
            super().execute_job(job, queue)
        except services.REDIS_DOWN as error:
            log.warning("Worker %s: Redis went away while RQ recorded job %s (%r)", self.name, job.id, error)
            self.set_state(WorkerStatus.IDLE)

    # --- Maintenance ----------------------------------------------------------------------

    def run_maintenance_tasks(self) -> None:
        self._in_maintenance = True
        try:
            for task in (
                super().run_maintenance_tasks,
                services.recover_abandoned_jobs,  # before recover_lost_jobs: JOB_HEARTBEAT_TIMEOUT_S says "failed"
                services.recover_lost_jobs,
                services.requeue_lost_jobs,
                services.forget_deleted_lora,
                training_folders.sweep,
                services.sweep_job_folders,
                self._sweep_orphan_files,
            ):
                try:
                    task()
                except StopRequested:
                    raise  # SIGTERM arrived during the task: RQ's warm shutdown, which must not be swallowed
                except services.REDIS_DOWN as error:
                    log.warning("maintenance task %s: Redis cannot be reached (%r)", task.__name__, error)
                except Exception:  # a failing disk or storage must not stop the worker (RQ quits on errors here)
                    log.exception("maintenance task %s failed; the next round tries again", task.__name__)
        finally:
            self._in_maintenance = False
        if self._stop_requested:
            raise StopRequested()  # asked during the round: stops here, between tasks, not inside one

    def _sweep_orphan_files(self) -> None:
        """One worker of all sweeps media files every ORPHAN_SWEEP_EVERY_S: it walks every folder."""
        if self.connection.set("photobooth:orphan-sweep", self.name, nx=True, ex=ORPHAN_SWEEP_EVERY_S):
            services.sweep_orphan_files()

    # --- Shutdown -------------------------------------------------------------------------

    def request_stop(self, signum, frame) -> None:
        """The first SIGTERM or SIGINT: the running job stops at its next step (a training step, a
        portrait batch) and goes back in line, and the worker exits. RQ's waited for the whole job,
        which `make run` and container runtimes cut short after 10-15 s.

        Only a worker waiting for a job is interrupted here (as RQ does): anywhere else, an exception
        raised by a signal handler can land inside a transaction or a thread's start."""
        self._shutdown_requested_date = now()
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        log.info("Worker %s: stopping (a second signal stops it at once)", self.name)
        self._stop_requested = True
        jobs.worker_stopping.set()
        if self.get_state() != WorkerStatus.BUSY and not self._in_maintenance:
            raise StopRequested()

    def request_force_stop(self, signum, frame) -> None:
        """A second signal: the running job goes back in line and the worker's temporary folder goes,
        from a thread (this handler may have interrupted a transaction, which must end first), and
        the process exits within COLD_STOP_S whatever happens. RQ raised SystemExit wherever the job
        was: the row stayed "running", and once in three the process hung in a thread's start."""
        if now() - self._shutdown_requested_date < timedelta(seconds=1):
            return  # the same stop sent twice (Ctrl-C reaches the launcher and the worker)
        log.warning("Worker %s: stopping at once", self.name)
        watchdog = threading.Timer(COLD_STOP_S, os._exit, args=(1,))
        watchdog.daemon = True
        watchdog.start()
        threading.Thread(target=self._stop_at_once, name="cold-stop", daemon=True).start()

    def _stop_at_once(self) -> None:
        try:
            services.put_back_jobs_of_worker(self.name, f"Worker {self.name} was stopped at once (a second signal).")
        except Exception:  # noqa: BLE001  (it exits all the same; the lost-job check ends the run)
            log.exception("Worker %s: its jobs could not be put back in line", self.name)
        shutil.rmtree(services.worker_folder(), ignore_errors=True)
        self._beats_stopped.set()
        try:
            self.register_death()
        except Exception:  # noqa: BLE001
            log.warning("Worker %s: the exit could not be recorded in Redis", self.name)
        logging.shutdown()
        os._exit(0)
