"""The live channel, through the real ASGI stack and a real Redis channel layer."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from photobooth.asgi import application
from studio import services
from studio.consumers import CLOSE_UNAUTHENTICATED
from studio.models import Job, Persona

pytestmark = pytest.mark.django_db(transaction=True)


def socket(client: Client | None = None, origin: bytes = b"http://localhost") -> WebsocketCommunicator:
    headers = [(b"origin", origin)]
    if client is not None:
        headers.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
    return WebsocketCommunicator(application, "/ws/jobs/", headers=headers)


def job_for(user, name: str) -> Job:
    persona = Persona.objects.create(owner=user, name=name)
    return Job.objects.create(persona=persona, kind=Job.Kind.TRAIN, progress=0.25)


def test_anonymous_socket_is_refused():
    async def scenario():
        communicator = socket()
        connected, code = await communicator.connect()
        assert not connected
        assert code == CLOSE_UNAUTHENTICATED

    async_to_sync(scenario)()


def test_socket_from_foreign_origin_is_refused(owner_client):
    async def scenario():
        communicator = socket(owner_client, origin=b"https://evil.example")
        connected, _code = await communicator.connect()
        assert not connected

    async_to_sync(scenario)()


def test_socket_gets_own_jobs_on_connect_and_only_own_updates(owner, other_user, owner_client, other_client):
    own_job = job_for(owner, "Owner double")
    other_job = job_for(other_user, "Other double")

    async def scenario():
        mine, theirs = socket(owner_client), socket(other_client)
        assert (await mine.connect())[0]
        assert (await theirs.connect())[0]

        panel = await mine.receive_from()
        assert 'id="jobs" hx-swap-oob="true"' in panel
        assert f'id="job-{own_job.id}"' in panel and "Owner double" in panel
        # Each double's status too: a page that missed a change while its socket was closed catches up.
        assert f'id="persona-{own_job.persona_id}-status"' in panel
        assert "Other double" not in panel
        await theirs.receive_from()  # the other person's own panel

        # Each socket's next message is its own person's: one meant for the other person, sent
        # before it, would have come first (the layer keeps each socket's messages in order).
        await sync_to_async(services.publish_job)(own_job)
        update = await mine.receive_from()
        assert f'id="job-{own_job.id}"' in update and 'hx-swap-oob="true"' in update

        await sync_to_async(services.publish_job)(other_job)
        assert f'id="job-{other_job.id}"' in await theirs.receive_from()

        # A double's new status, with the value the persona page compares with its body's (site.js).
        await sync_to_async(services.set_persona_status)(own_job.persona, Persona.Status.READY)
        update = await mine.receive_from()
        persona_id = own_job.persona_id
        span = f'<span id="persona-{persona_id}-status" class="status" data-status="ready" hx-swap-oob="true">'
        assert span + "Ready</span>" in update

        await sync_to_async(services.publish_job)(other_job)
        assert f'id="job-{other_job.id}"' in await theirs.receive_from()

        await mine.disconnect()
        await theirs.disconnect()

    async_to_sync(scenario)()


def test_socket_quiet_longer_than_a_blocking_receive_still_gets_updates(owner, owner_client):
    """A page waits long between updates: its socket outlives the layer's blocking Redis reads."""
    job = job_for(owner, "Double")
    quiet_s = get_channel_layer().brpop_timeout + 1.5

    async def scenario():
        page = socket(owner_client)
        assert (await page.connect())[0]
        await page.receive_from()
        assert await page.receive_nothing(timeout=quiet_s, interval=0.5)
        await sync_to_async(services.publish_job)(job)
        assert f'id="job-{job.id}"' in await page.receive_from(timeout=5)
        await page.disconnect()

    async_to_sync(scenario)()


@pytest.mark.parametrize("language", ["cookie", "accept-language"])
def test_each_page_gets_updates_in_its_own_language(owner, owner_client, language):
    """The worker runs in English; a page shown in Chinese gets its fragments in Chinese."""
    job = job_for(owner, "Double")
    chinese = socket(owner_client)
    if language == "cookie":
        chinese.scope["headers"] = [(b"origin", b"http://localhost"), (b"cookie", (
            f"sessionid={owner_client.cookies['sessionid'].value}; django_language=zh-hans").encode())]
    else:
        chinese.scope["headers"].append((b"accept-language", b"zh-CN,zh;q=0.9"))
    english = socket(owner_client)

    async def scenario():
        assert (await chinese.connect())[0] and (await english.connect())[0]
        assert "等待中" in await chinese.receive_from()  # the panel on connect: "Waiting"
        assert "Waiting" in await english.receive_from()
        await sync_to_async(services.publish_job)(job)
        assert "等待中" in await chinese.receive_from()
        assert "Waiting" in await english.receive_from()
        await chinese.disconnect()
        await english.disconnect()

    async_to_sync(scenario)()
