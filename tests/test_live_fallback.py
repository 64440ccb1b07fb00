"""The jobs panel's live updates, in real headless Chromium against the site as `make run` serves
it, with the real Redis behind its channel layer.

While the socket is down the panel fetches itself every 5 s; when the socket returns, its first
message brings the page up to date (whatever changed while it was down), and the polling stops.
The socket is taken down in the browser (Playwright's WebSocket routing closes each attempt with
1013 "try again later", as the server does while Redis is away), so the page's own scripts and
the htmx ws extension's reconnecting are what is tested.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from playwright.sync_api import Browser, Page, WebSocketRoute, expect, sync_playwright

from photobooth.dev import free_port
from studio import services
from studio.models import Job
from tests.browser import launch_chromium
from tests.conftest import PASSWORD
from tests.processes import start_web_server, stop

pytestmark = pytest.mark.django_db(transaction=True)

POLL_S = 5  # the panel's hx-trigger: "every 5s [!window.photoboothLive]"

# What the page did, recorded by the page itself: each request of the panel with whether the socket
# was live when it was sent, the socket's opens and closes, and the socket's messages.
RECORDER = """
window.liveLog = {polls: [], opens: 0, closes: 0, messages: []};
document.addEventListener("htmx:beforeRequest", (event) => {
  if (event.detail.pathInfo.requestPath.startsWith("/jobs/panel/")) liveLog.polls.push(window.photoboothLive);
});
document.addEventListener("htmx:wsOpen", () => { liveLog.opens += 1; });
document.addEventListener("htmx:wsClose", () => { liveLog.closes += 1; });
document.addEventListener("htmx:wsBeforeMessage", (event) => { liveLog.messages.push(event.detail.message); });
"""


@pytest.fixture
def site():
    port = free_port()
    server = start_web_server(port, Path(settings.MEDIA_ROOT).parent)
    yield f"http://127.0.0.1:{port}"
    print(stop(server)[-4000:])  # shown when the test fails


@pytest.fixture
def database_thread():
    """Runs the test's database calls while Playwright's event loop holds the test's thread (Django
    refuses them there)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        yield lambda call, *args: thread.submit(call, *args).result()
        thread.submit(lambda: connection.close()).result()  # the thread's own connection


def signed_in_page(browser: Browser, site: str, user, route_socket=None) -> Page:
    """A phone-sized page of the person's doubles, signed in through the login form, recording what
    it does (RECORDER); its live socket goes through `route_socket` when given."""
    page = browser.new_context(viewport={"width": 420, "height": 900}).new_page()
    page.set_default_timeout(30_000)
    page.add_init_script(RECORDER)
    if route_socket:
        page.route_web_socket(re.compile(r"/ws/jobs/$"), route_socket)
    page.goto(site + "/accounts/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("main button[type=submit]:has-text('Log in')")
    expect(page.locator("h1")).to_have_text("My digital doubles")
    return page


def running_job(persona) -> Job:
    """A build that a worker has started. No worker is named, so no page ends it as lost."""
    return Job.objects.create(owner=persona.owner, persona=persona, kind=Job.Kind.TRAIN, status=Job.Status.RUNNING,
                              stage="preprocess", progress=0.1, started=timezone.now())


def move_to(job: Job, stage: str, progress: float) -> None:
    """The job's worker reaching a stage, as its progress callback stores it (not published)."""
    job.stage, job.progress, job.heartbeat = stage, progress, timezone.now()
    job.save(update_fields=["stage", "progress", "heartbeat"])


def test_the_jobs_panel_polls_while_the_socket_is_down_and_catches_up_when_it_returns(site, owner, database_thread):
    job = running_job(services.create_persona(owner, "Me"))
    socket_up = False
    connected: list[WebSocketRoute] = []

    def route_socket(socket: WebSocketRoute) -> None:
        if socket_up:
            socket.connect_to_server()
            connected.append(socket)
        else:
            socket.close(code=1013, reason="test: down")

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = signed_in_page(browser, site, owner, route_socket)
        panel = page.locator(f"#job-{job.pk}")
        expect(panel).to_contain_text("Preparing photos")
        page.wait_for_function("liveLog.closes >= 1")  # the socket tried, and was refused

        # Down: the panel fetches itself and shows the new stage within one poll.
        database_thread(move_to, job, "training", 0.4)
        expect(panel).to_contain_text("Training", timeout=(POLL_S + 5) * 1000)
        expect(panel.locator("progress")).to_have_attribute("value", "40")
        polls = page.evaluate("liveLog.polls")
        assert polls and not any(polls), polls

        # Back: the socket's first message carries what changed while it was down.
        database_thread(move_to, job, "validating", 0.7)
        socket_up = True
        page.wait_for_function("window.photoboothLive === true", timeout=90_000)  # after the ws extension's backoff
        assert connected
        page.wait_for_function("liveLog.messages.length >= 1")
        caught_up = page.evaluate("liveLog.messages[0]")
        assert f'id="job-{job.pk}"' in caught_up and "Checking the likeness" in caught_up, caught_up
        expect(panel).to_contain_text("Checking the likeness")

        # Live: no polling; a change arrives over the socket. It is published after more than one
        # poll interval, so a poll sent while live would be in the log by the time it shows.
        time.sleep(POLL_S + 1)
        database_thread(move_to, job, "fusing", 0.9)
        assert database_thread(services.publish_job, job)
        expect(panel).to_contain_text("Finishing")
        expect(panel.locator("progress")).to_have_attribute("value", "90")
        polls_when_live = [live for live in page.evaluate("liveLog.polls") if live]
        assert polls_when_live == [], page.evaluate("liveLog")
        assert page.evaluate("window.photoboothLive") is True
        browser.close()


def test_a_job_the_page_does_not_show_yet_appears_with_its_first_live_update(site, owner, database_thread):
    """A job asked for in another tab, or started after the page was rendered: its updates name an
    element the page lacks, so the panel fetches itself (while live it does not poll)."""
    persona = services.create_persona(owner, "Me")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = signed_in_page(browser, site, owner)
        page.wait_for_function("window.photoboothLive === true")
        expect(page.locator("#jobs")).to_contain_text("Nothing is running.")

        job = database_thread(running_job, persona)
        assert database_thread(services.publish_job, job)  # as run_job publishes a job it starts

        expect(page.locator(f"#job-{job.pk}")).to_contain_text("Preparing photos")
        assert page.evaluate("liveLog.closes") == 0  # live all along: no poll brought it
        browser.close()
