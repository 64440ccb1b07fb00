"""Types every pipeline stage shares: progress reports and cooperative cancellation."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """One progress report: `fraction` is 0..1 within `stage`; `detail` is free text for logs."""

    stage: str
    fraction: float
    detail: str = ""
    eta_s: float | None = None


ProgressCallback = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    """Default callback for callers that do not watch progress."""


class Cancelled(Exception):
    """Raised by a stage when its cancel token is set; the stage leaves no partial output."""


class CancelToken:
    """Thread-safe flag a caller sets to stop a running stage at its next check."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def gettext_noop(message: str) -> str:
    """Marks a person-facing message for translation without importing Django.

    `manage.py makemessages` extracts calls by this name; the site translates the
    English text with `gettext(message)` when it shows it.
    """
    return message
