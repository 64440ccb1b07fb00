"""The live channel: one socket per open page, joined to its owner's group only."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import HttpRequest
from django.utils import translation

from studio import services

# Close code for an unauthenticated socket (4000-4999 are free for applications).
CLOSE_UNAUTHENTICATED = 4401


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

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.group = services.user_group(user.id)
        self.language = page_language(self.scope)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send(text_data=await database_sync_to_async(services.render_live_state)(user, self.language))

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def job_update(self, event: dict) -> None:
        await self.send(text_data=event["html"][self.language])
