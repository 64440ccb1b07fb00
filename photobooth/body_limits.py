"""Bounds every HTTP request body before Django reads it (ASGI middleware, see photobooth/asgi.py).

Django's ASGI handler reads a whole body (to a temporary file) before any view or middleware of
its own runs, and the server beside it sets no limit, so both limits live here, in front of it:

- **Size.** A body larger than REQUEST_MAX_BYTES (a full double's photos plus the form around
  them) is answered 413 with templates/413.html in the person's language. A declared
  Content-Length over the limit is refused before one byte of the body is read; a body without
  one (chunked) is counted and refused as soon as it passes the limit.
- **Time.** A body must arrive within REQUEST_BODY_TIMEOUT_S plus one second for every
  REQUEST_BODY_MIN_KBPS kilobytes received (Apache's mod_reqtimeout rule): a slow phone
  uploading 300 MB keeps going, a body that trickles at 1 KB/s or stalls is cut with 408.

Either refusal closes the connection (`Connection: close`), since the rest of the body is never
read. Websockets do not pass through here.
"""

from __future__ import annotations

import asyncio
import io
import time

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.template.loader import render_to_string
from django.utils import translation

DISCONNECT = {"type": "http.disconnect"}


def declared_length(scope: dict) -> int | None:
    """The request's Content-Length, or None when it has none (chunked) or it is not a number
    (the server refuses such a request before it gets here)."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def refusal_page(scope: dict, template: str) -> bytes:
    """An error page in the language the request asks for (cookie, then Accept-Language), as
    Django's LocaleMiddleware would pick it; error pages need no request context."""
    language = translation.get_language_from_request(ASGIRequest(scope, io.BytesIO()))
    context = {"photos": settings.PHOTOS_PER_PERSONA, "megabytes": settings.PHOTO_MAX_BYTES // 2**20}
    with translation.override(language):
        return render_to_string(template, context).encode()


async def refuse(scope: dict, send, status: int, template: str) -> None:
    page = refusal_page(scope, template)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(page)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": page})


class BodyLimits:
    """Wraps the HTTP application: refuses an over-long body (413) or a slow one (408) itself,
    and then tells the application the client went away, so Django stops reading quietly."""

    def __init__(self, app, max_bytes: int | None = None, timeout_s: float | None = None,
                 min_bytes_per_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = settings.REQUEST_MAX_BYTES if max_bytes is None else max_bytes
        self.timeout_s = settings.REQUEST_BODY_TIMEOUT_S if timeout_s is None else timeout_s
        self.min_bytes_per_s = settings.REQUEST_BODY_MIN_KBPS * 1000 if min_bytes_per_s is None else min_bytes_per_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_bytes:
            await refuse(scope, send, 413, "413.html")
            return
        await self.app(scope, self._bounded_receive(scope, receive, send), send)

    def _bounded_receive(self, scope, receive, send):
        """`receive` with the size and time limits; after the body, the plain `receive` (Django
        then waits on it for the client's disconnect, which may be a long while)."""
        started = time.monotonic()
        received = 0
        body_done = False
        refused = False

        async def bounded_receive() -> dict:
            nonlocal received, body_done, refused
            if refused:
                return DISCONNECT
            if body_done:
                return await receive()
            deadline = started + self.timeout_s + received / self.min_bytes_per_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                refused = True
                await refuse(scope, send, 408, "400.html")
                return DISCONNECT
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                await refuse(scope, send, 413, "413.html")
                return DISCONNECT
            body_done = not message.get("more_body", False)
            return message

        return bounded_receive
