"""The live channel: one socket per open page, joined to its owner's group only."""

from __future__ import annotations

import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import HttpRequest
from django.utils import translation

from studio import services

# Close code for an unauthenticated socket (4000-4999 are free for applications).
CLOSE_UNAUTHENTICATED = 4401
# "Try again later" (RFC 6455): live updates are paused while Redis cannot be reached.
CLOSE_TRY_AGAIN_LATER = 1013

logger = logging.getLogger(__name__)


def page_language(scope: dict) -> str:
    """The language the socket's page is shown in, chosen as LocaleMiddleware chose it for the
    page: the language cookie, else Accept-Language, else the default."""
    request = HttpRequest()
    request.COOKIES = scope.get("cookies", {})
    headers = dict(scope.get("headers", []))
    request.META["HTTP_ACCEPT_LANGUAGE"] = headers.get(b"accept-language", b"").decode("latin-1")
    return translation.get_language_from_request(request)


class JobsConsumer(AsyncWebsocketConsumer):
    """Pushes htmx out-of-band fragments of the person's jobs, in the page's language; receives nothing."""

    group: str | None = None
    language: str = ""

    async def __call__(self, scope, receive, send) -> None:
        """A channel layer that loses Redis (its receive fails) ends the socket with "try again later"
        rather than an error: the page polls meanwhile and reconnects after a pause."""
        try:
            await super().__call__(scope, receive, send)
        except services.REDIS_DOWN as error:
            logger.warning("live socket: Redis cannot be reached (%r); the page tries again later", error)
            try:
                await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
            except Exception:  # noqa: BLE001  (the socket is already gone)
                pass

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.language = page_language(self.scope)
        joined = await self._join(services.user_group(user.id))
        await self.accept()
        await self.send(text_data=await database_sync_to_async(services.render_live_state)(user, self.language))
        if not joined:
            # Live updates need Redis: the page got where its jobs stand, polls meanwhile, and its
            # socket tries again after a pause (the ws extension reconnects on 1013).
            await self.close(code=CLOSE_TRY_AGAIN_LATER)

    async def _join(self, group: str) -> bool:
        """Joins the person's group; a second try takes a fresh connection after a Redis restart (the
        pooled one is dead); False when Redis cannot be reached."""
        for attempt in range(2):
            try:
                await self.channel_layer.group_add(group, self.channel_name)
                self.group = group
                return True
            except services.REDIS_DOWN as error:
                logger.warning("live socket: Redis cannot be reached (%r), try %d", error, attempt + 1)
        return False

    async def disconnect(self, code: int) -> None:
        if self.group:
            try:
                await self.channel_layer.group_discard(self.group, self.channel_name)
            except services.REDIS_DOWN:
                pass  # Redis forgets the membership by itself (channels_redis's group expiry)

    async def job_update(self, event: dict) -> None:
        await self.send(text_data=event["html"][self.language])
