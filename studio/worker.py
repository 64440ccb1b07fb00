"""The RQ worker class for Photobooth (settings.RQ["WORKER_CLASS"]).

It does not fork (RQ's default forks per job): models loaded by one job stay resident for
the next, and a parent that touched CUDA never forks a CUDA child. Every maintenance round
(each `MAINTENANCE_INTERVAL_S`) it also fails jobs whose worker was lost, puts back in line
waiting jobs whose queue entry was lost and dispatches waiting jobs, removes the training
folders that no build will resume (studio.training_folders) and forgets the fused LoRA of a
double deleted since its last portraits.
"""

from __future__ import annotations

import logging

from rq import SimpleWorker
from rq.exceptions import StopRequested

from studio import services, training_folders

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL_S = 20


class StudioWorker(SimpleWorker):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL_S)
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        """An idle worker wakes this often, so maintenance runs on time (RQ waits worker_ttl - 15 s)."""
        return MAINTENANCE_INTERVAL_S

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        services.recover_abandoned_jobs()
        for task in (services.requeue_lost_jobs, services.forget_deleted_lora, training_folders.sweep):
            try:
                task()
            except StopRequested:
                raise  # SIGTERM arrived during the task: RQ's warm shutdown, which must not be swallowed
            except Exception:  # a failing disk or storage must not stop the worker (RQ quits on errors here)
                log.exception("maintenance task %s failed; the next round tries again", task.__name__)
