"""The whole journey in real headless Chromium against the site as `make run` serves it, Redis and a worker.

Screenshots land in PHOTOBOOTH_ARTIFACTS (default: test-artifacts/ in the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from playwright.sync_api import expect, sync_playwright

from photobooth.dev import free_port
from studio.models import Portrait
from tests.browser import launch_chromium
from tests.jobs_fixtures import FACES, demo_templates, five_obamas
from tests.processes import ROOT, start_web_server, start_worker, stop

pytestmark = pytest.mark.django_db(transaction=True)
ARTIFACTS = Path(os.environ.get("PHOTOBOOTH_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture
def site(tmp_path):
    """The web server serving the site on a free port, and a worker, both on this test's database."""
    port = free_port()
    server = start_web_server(port, Path(settings.MEDIA_ROOT).parent)
    worker = start_worker()
    yield f"http://127.0.0.1:{port}"
    for process in (server, worker):
        print(stop(process)[-4000:])  # shown when the test fails


def screenshot(page, name: str) -> None:
    """A full-page screenshot once every image on the page has loaded (lazy ones are made eager),
    and one that the site failed to serve fails the test. All in the page itself, by no element
    handle: a live update may replace a panel meanwhile (scrolling to an image of the replaced
    panel failed with "Element is not attached to the DOM")."""
    page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(image => { image.loading = 'eager'; })")
    page.wait_for_function("[...document.images].every(image => image.complete)")
    broken = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
    assert broken == []
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_sign_up_to_portraits_to_deleting_everything(site, owner, tmp_path):
    first, second = demo_templates(owner, 2)  # staff content in the gallery
    second.title = "Supercalifragilistic" * 6  # one 120-letter word: it must wrap inside its card
    second.save()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 420, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(90_000)
        expect.set_options(timeout=90_000)

        page.goto(site + "/signup/")
        page.fill("#id_username", "alice")
        page.fill("#id_email", "alice@example.com")
        page.fill("#id_password1", "a long enough passphrase")
        page.fill("#id_password2", "a long enough passphrase")
        page.click("button[type=submit]:has-text('Sign up')")
        expect(page.locator("h1")).to_have_text("My digital doubles")

        page.fill("#id_name", "Holiday me")
        page.click("button:has-text('Create')")
        page.check("#id_agree")
        page.click("button:has-text('I agree')")
        # One file more than there is room for is refused in the browser, before anything is sent
        # (past 40 files Django would refuse the request before our form could explain).
        too_many = [tmp_path / f"{index}.jpg" for index in range(21)]
        for path in too_many:
            path.write_bytes((FACES / "obama_small.jpg").read_bytes())
        page.wait_for_load_state()  # the page's scripts, as a person's would have
        page.set_input_files("input[type=file]", [str(path) for path in too_many])
        posts: list[str] = []

        def record_post(request) -> None:
            if request.method == "POST":
                posts.append(request.url)

        page.on("request", record_post)
        page.click("button:has-text('Upload')")
        # Files that arrive without a change event (chosen before the script ran) are checked as
        # htmx sends.
        page.eval_on_selector(
            "input[type=file]",
            """input => {
                const files = new DataTransfer();
                for (let i = 0; i < 21; i++) files.items.add(new File(["x"], `${i}.jpg`, {type: "image/jpeg"}));
                input.setCustomValidity("");
                input.files = files.files;
            }""",
        )
        page.click("button:has-text('Upload')")
        # A request the page sends after the click: an upload the click sent would be recorded first.
        with page.expect_request("**/static/favicon.svg?after-upload-clicks"):
            page.evaluate("fetch('/static/favicon.svg?after-upload-clicks')")
        page.remove_listener("request", record_post)
        assert posts == []
        assert page.eval_on_selector("input[type=file]", "input => input.validationMessage") == (
            "You can add 20 more photos to this double. Please choose fewer."
        )
        # A refused batch (400) from the server is shown in place, through htmx: the browser's check
        # is lifted (a page older than the last upload has more room than the double).
        page.eval_on_selector(
            "input[type=file]",
            "input => { input.dataset.room = 100; input.dispatchEvent(new Event('change', {bubbles: true})); }",
        )
        page.click("button:has-text('Upload')")
        expect(page.locator("#photos")).to_contain_text("You can add 20 more photos to this double; you sent 21.")
        page.set_input_files(
            "input[type=file]",
            [{"name": name, "mimeType": "image/jpeg", "buffer": data} for name, data in five_obamas()],
        )
        page.click("button:has-text('Upload')")
        expect(page.locator(".counter")).to_contain_text("5 good photos.")
        screenshot(page, "1-photos.png")

        # Another tab acts meanwhile; this tab's htmx requests that fail say so, and keep the panel.
        other_tab = context.new_page()
        other_tab.goto(page.url)
        other_tab.click("#photos form[action$='/delete/'] button >> nth=0")
        expect(other_tab.locator(".counter")).to_contain_text("4 good photos.")
        # This tab deletes the same photo: a 404 (in this DEBUG site, Django's technical page: the
        # line's own words; test_error_pages checks the production pages).
        page.click("#photos form[action$='/delete/'] button >> nth=0")
        expect(page.locator("#request-error")).to_have_text("That did not work. Please reload the page and try again.")
        expect(page.locator(".counter")).to_contain_text("5 good photos.")
        name, data = five_obamas()[0]
        page.set_input_files("input[type=file]", [{"name": name, "mimeType": "image/jpeg", "buffer": data}])
        page.click("button:has-text('Upload')")
        expect(page.locator(".counter")).to_contain_text("5 good photos.")
        expect(page.locator("#request-error")).to_be_hidden()

        def log_in(tab) -> None:
            tab.fill("#id_username", "alice")
            tab.fill("#id_password", "a long enough passphrase")
            tab.click("button[type=submit]:has-text('Log in')")

        # Signed out in the other tab: this tab's next delete takes the whole tab to the login page,
        # and back here after logging in.
        other_tab.click("button:has-text('Log out')")
        persona_page = page.url
        page.click("#photos form[action$='/delete/'] button >> nth=0")
        page.wait_for_url("**/accounts/login/**")
        expect(page.locator(".message[role=status]")).to_contain_text("You were logged out, so that was not done.")
        log_in(page)
        page.wait_for_url(persona_page)
        # Logged out and in again there: this tab's token is stale, and the 403 page's words show.
        other_tab.goto(site + "/accounts/login/")
        log_in(other_tab)
        other_tab.close()
        page.click("#photos form[action$='/delete/'] button >> nth=0")
        expect(page.locator("#request-error")).to_contain_text(
            "This page is out of date We could not confirm that this came from an up-to-date page of this site"
        )
        expect(page.locator(".counter")).to_contain_text("5 good photos.")
        page.reload()

        page.click("button:has-text('Build my digital double')")
        page.evaluate("window.notReloaded = true")
        # Queued -> Preparing photos -> Ready arrive over the websocket; the page is not reloaded.
        expect(page.locator("[id$='-status'].status")).to_have_text("Ready")
        # ... and so does the rest of the page: the ready double in place of the upload form.
        expect(page.locator("a:has-text('Choose templates')")).to_be_visible()
        expect(page.locator("input[type=file]")).to_have_count(0)
        assert page.evaluate("window.notReloaded") is True
        screenshot(page, "2-progress.png")

        page.goto(site + "/gallery/")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420  # no sideways scrolling
        page.check(f"input[name=templates][value='{first.id}']")
        page.check(f"input[name=templates][value='{second.id}']")
        page.click("button:has-text('Make my portraits')")
        page.evaluate("window.notReloaded = true")
        screenshot(page, "3-progress.png")  # the job, as it starts
        # Each arrives live, then takes its place in its double's group, with the group's actions.
        expect(page.locator(".album-group .portrait")).to_have_count(2)
        expect(page.locator("#album-live .portrait")).to_have_count(0)
        expect(page.locator(".album-group a:has-text('Download all (zip)')")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        assert page.evaluate("window.notReloaded") is True
        screenshot(page, "4-album-live.png")

        page.click(".album-group .portrait a >> nth=0")
        page.wait_for_url("**/portraits/*/")
        with page.expect_download() as download:
            page.click("a[href$='/download/']")
        saved = ARTIFACTS / "downloaded-portrait.jpg"
        download.value.save_as(saved)
        assert saved.stat().st_size > 10_000

        # (No ORM here: Playwright's event loop makes this thread async to Django.)
        stored = list((Path(settings.MEDIA_ROOT) / "users").glob("*/portraits/*"))
        assert len(stored) == 4  # two portraits and their thumbnails
        page.goto(site + "/account/delete/")
        page.check("#id_confirm")
        page.click("button:has-text('Delete my data')")
        expect(page.locator(".message[role=status]")).to_contain_text("All your photos, doubles and portraits are deleted.")
        page.goto(site + "/album/")
        expect(page.locator("#album-empty")).to_be_visible()
        screenshot(page, "5-deleted.png")
        browser.close()

    assert not any(path.exists() for path in stored)
    assert not list((Path(settings.MEDIA_ROOT) / "users").glob("*/*"))
    assert not Portrait.objects.exists()
