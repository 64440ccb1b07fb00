"""Request bodies are bounded: photobooth.body_limits in process, then the real web server.

The server tests run the site as `make run` serves it (granian), with PHOTO_MAX_MB=3 so that its
limit (20 x 3 MiB + 1 MiB) is cheap to cross, and REQUEST_BODY_TIMEOUT_S=2 so that a trickle is
cut within seconds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from django.test import Client

from photobooth.body_limits import BodyLimits
from photobooth.dev import free_port
from studio import services
from studio.models import Persona, Photo
from tests.processes import start_web_server, stop

FACES = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", Path(__file__).resolve().parents[2] / "shared" / "faces"))
SERVER_PHOTO_MAX_MB = 3
SERVER_LIMIT = 20 * SERVER_PHOTO_MAX_MB * 2**20 + 2**20
SERVER_BODY_TIMEOUT_S = 2
TOO_LARGE_EN = "That upload is too large"
TOO_LARGE_ZH = "这次上传的内容太大了"
CUT_OFF_EN = "We could not read that request"


# In process: the middleware around a stand-in for Django's handler, which reads the whole body.

def run_app(limits_app, scope_headers, messages, delay_s: float = 0.0):
    """Runs BodyLimits(app) on one request whose body arrives as `messages`, `delay_s` apart.
    Returns what was sent to the client, the body the app read, and how often it called receive."""
    sent, read, calls = [], [], [0]
    pending = list(messages)

    async def receive():
        calls[0] += 1
        if not pending:
            await asyncio.sleep(3600)  # the client says nothing more
        await asyncio.sleep(delay_s)
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # Django's handler: RequestAborted, nothing sent
            read.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "path": "/personas/1/photos/", "query_string": b"",
             "headers": scope_headers}
    asyncio.run(limits_app(app)(scope, receive, send))
    return sent, b"".join(read), calls[0]


def limits(max_bytes=100, timeout_s=5.0, min_bytes_per_s=1000.0):
    return lambda app: BodyLimits(app, max_bytes=max_bytes, timeout_s=timeout_s, min_bytes_per_s=min_bytes_per_s)


def status_and_page(sent) -> tuple[int, str]:
    return sent[0]["status"], b"".join(message.get("body", b"") for message in sent[1:]).decode()


def test_a_body_at_the_limit_reaches_the_app():
    sent, read, _ = run_app(limits(), [(b"content-length", b"100")],
                            [{"type": "http.request", "body": b"x" * 60, "more_body": True},
                             {"type": "http.request", "body": b"x" * 40}])
    assert status_and_page(sent) == (200, "ok") and read == b"x" * 100


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    sent, read, calls = run_app(limits(), [(b"content-length", b"101")], [{"type": "http.request", "body": b"x" * 101}])
    status, page = status_and_page(sent)
    assert status == 413 and TOO_LARGE_EN in page and "data-error-page" in page
    assert (b"connection", b"close") in sent[0]["headers"]
    assert calls == 0 and read == b""


def test_a_body_without_a_length_is_counted_and_refused_past_the_limit():
    chunks = [{"type": "http.request", "body": b"x" * 40, "more_body": True} for _ in range(10)]
    sent, read, calls = run_app(limits(), [], chunks)
    status, page = status_and_page(sent)
    assert status == 413 and TOO_LARGE_EN in page
    assert calls == 3  # 120 bytes read, then no more


def test_the_refusal_speaks_the_persons_language():
    sent, _, _ = run_app(limits(), [(b"content-length", b"1000"), (b"accept-language", b"zh-CN,zh;q=0.9")], [])
    status, page = status_and_page(sent)
    assert status == 413 and TOO_LARGE_ZH in page and '<html lang="zh-hans">' in page
    sent, _, _ = run_app(limits(), [(b"content-length", b"1000"), (b"cookie", b"django_language=zh-hans")], [])
    assert TOO_LARGE_ZH in status_and_page(sent)[1]


def test_a_body_slower_than_the_minimum_rate_is_cut():
    # 10 bytes every 0.1 s (100 B/s) against 0.3 s of grace plus a second per 1,000 bytes.
    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True} for _ in range(50)]
    started = time.monotonic()
    sent, read, _ = run_app(limits(max_bytes=10_000, timeout_s=0.3), [], chunks, delay_s=0.1)
    status, page = status_and_page(sent)
    assert status == 408 and CUT_OFF_EN in page
    assert 0.3 < time.monotonic() - started < 1.0 and len(read) < 100


def test_a_body_at_a_good_rate_is_not_cut():
    chunks = [{"type": "http.request", "body": b"x" * 100, "more_body": True} for _ in range(9)]
    sent, read, _ = run_app(limits(max_bytes=10_000, timeout_s=0.3), [], chunks + [{"type": "http.request", "body": b""}],
                            delay_s=0.05)  # 2,000 B/s for 0.5 s: past the grace, above the rate
    assert status_and_page(sent) == (200, "ok") and len(read) == 900


# The real server.

@dataclass
class Site:
    port: int
    data_dir: Path
    process: psutil.Process

    def rss(self) -> int:
        """Resident memory of the server and its worker processes together."""
        processes = [self.process, *self.process.children(recursive=True)]
        return sum(process.memory_info().rss for process in processes)


@pytest.fixture(scope="module")
def site(django_db_setup, tmp_path_factory):
    port = free_port()
    data_dir = tmp_path_factory.mktemp("site")
    server = start_web_server(port, data_dir, PHOTO_MAX_MB=str(SERVER_PHOTO_MAX_MB),
                              REQUEST_BODY_TIMEOUT_S=str(SERVER_BODY_TIMEOUT_S))
    yield Site(port, data_dir, psutil.Process(server.pid))
    print(stop(server)[-4000:])  # shown when a test fails


def post_head(site: Site, framing: str) -> bytes:
    return (f"POST /personas/1/photos/ HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\n{framing}\r\n\r\n").encode()


def read_answer(connection: socket.socket, timeout_s: float = 10) -> bytes:
    """What the server answers, until it closes the connection."""
    connection.settimeout(timeout_s)
    answer = b""
    try:
        while chunk := connection.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def send_until_answered(connection: socket.socket, chunks, pause_s: float = 0.0) -> tuple[int, bytes]:
    """Sends chunks until the server answers; returns the bytes sent and the answer."""
    sent = 0
    connection.settimeout(10)
    for chunk in chunks:
        if select.select([connection], [], [], pause_s)[0]:
            break
        try:
            connection.sendall(chunk)
        except OSError:  # it answered and closed while we were sending
            break
        sent += len(chunk)
    return sent, read_answer(connection)


@pytest.mark.django_db(transaction=True)
def test_a_300_mb_post_is_answered_413_at_once_unread(site):
    with socket.create_connection(("127.0.0.1", site.port)) as connection:
        started = time.monotonic()
        connection.sendall(post_head(site, "Content-Length: 300000000") + b"x" * 65536)
        answer = read_answer(connection)
        elapsed = time.monotonic() - started
    page = answer.decode(errors="replace")
    assert answer.startswith(b"HTTP/1.1 413"), page[:300]
    assert TOO_LARGE_EN in page and f"at most 20 photos of at most {SERVER_PHOTO_MAX_MB} MB each" in page
    assert elapsed < 2


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_is_refused_as_it_passes_the_limit_and_never_held_in_memory(site):
    before = site.rss()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.wait(0.02):
            peak[0] = max(peak[0], site.rss())

    watcher = threading.Thread(target=watch)
    watcher.start()
    block = b"x" * 2**18
    chunks = (f"{len(block):x}\r\n".encode() + block + b"\r\n" for _ in range(2 * SERVER_LIMIT // len(block)))
    try:
        with socket.create_connection(("127.0.0.1", site.port)) as connection:
            connection.sendall(post_head(site, "Transfer-Encoding: chunked"))
            sent, answer = send_until_answered(connection, chunks)
    finally:
        done.set()
        watcher.join()
    assert answer.startswith(b"HTTP/1.1 413") and TOO_LARGE_EN.encode() in answer
    assert SERVER_LIMIT < sent < SERVER_LIMIT + 16 * 2**20  # what the sockets' buffers hold, no more
    assert peak[0] - before < 30 * 2**20, f"the server grew {(peak[0] - before) / 2**20:.0f} MB"


@pytest.mark.django_db(transaction=True)
def test_a_trickling_body_is_cut(site):
    """1 KB/s: the body must arrive within 2 s plus a second for every 10 KB."""
    with socket.create_connection(("127.0.0.1", site.port)) as connection:
        connection.sendall(post_head(site, "Content-Length: 100000"))
        started = time.monotonic()
        sent, answer = send_until_answered(connection, (b"x" * 100 for _ in range(200)), pause_s=0.1)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and CUT_OFF_EN.encode() in answer
    assert SERVER_BODY_TIMEOUT_S <= elapsed < SERVER_BODY_TIMEOUT_S + 3 and sent < 6000


@pytest.mark.django_db(transaction=True)
def test_an_upload_under_the_limit_is_stored(site, owner):
    services.give_face_consent(owner)
    persona = Persona.objects.create(owner=owner, name="Me")
    client = Client()
    client.force_login(owner)
    secret = "a" * 32  # a CSRF secret the request repeats in its header
    response = requests.post(
        f"http://127.0.0.1:{site.port}/personas/{persona.id}/photos/",
        files=[("photos", (name, (FACES / name).read_bytes(), "image/jpeg")) for name in ("obama.jpg", "obama1.jpg")],
        cookies={"sessionid": client.cookies["sessionid"].value, "csrftoken": secret},
        headers={"X-CSRFToken": secret},
        allow_redirects=False,
        timeout=120,
    )
    assert response.status_code == 302, response.text[:500]
    photos = list(Photo.objects.filter(persona=persona))
    assert len(photos) == 2 and all(photo.status != Photo.Status.PENDING for photo in photos)
    assert all((site.data_dir / "media" / photo.image.name).is_file() for photo in photos)


def websocket_first_message(site: Site, sessionid: str) -> tuple[bytes, str]:
    """Opens /ws/jobs/ as a browser would; returns the handshake's status line and the first text."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as connection:
        key = base64.b64encode(os.urandom(16)).decode()
        connection.sendall(
            (f"GET /ws/jobs/ HTTP/1.1\r\nHost: 127.0.0.1:{site.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{site.port}\r\n"
             f"Cookie: sessionid={sessionid}\r\n\r\n").encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(4096)
        head, frames = received.split(b"\r\n\r\n", 1)

        def take(count: int) -> bytes:
            nonlocal frames
            while len(frames) < count:
                frames += connection.recv(65536)
            taken, frames = frames[:count], frames[count:]
            return taken

        first, second = take(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(take(2), "big")
        elif length == 127:
            length = int.from_bytes(take(8), "big")
        assert first & 0x0F == 1, "a text frame"
        return head.split(b"\r\n")[0], take(length).decode()


@pytest.mark.django_db(transaction=True)
def test_websockets_and_static_files_work_under_the_server(site, owner):
    client = Client()
    client.force_login(owner)
    status, text = websocket_first_message(site, client.cookies["sessionid"].value)
    assert status.startswith(b"HTTP/1.1 101") and '<section id="jobs"' in text
    css = requests.get(f"http://127.0.0.1:{site.port}/static/css/site.css", timeout=10)
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css") and "body" in css.text


@pytest.mark.django_db
def test_a_raw_over_long_file_name_gets_words_for_it(owner_client, persona):
    """Without the page's script a browser sends the file's own name; Django refuses the whole
    request for one over 1 KB, and the 400 page must name that cause too."""
    services.give_face_consent(persona.owner)
    photo = io.BytesIO((FACES / "obama1.jpg").read_bytes())
    photo.name = "长" * 500 + ".jpg"  # as sent: SimpleUploadedFile would cut it to 255 characters
    response = owner_client.post(f"/personas/{persona.id}/photos/", {"photos": [photo]})
    assert response.status_code == 400
    assert "a file name that is too long" in response.content.decode()
    assert not Photo.objects.filter(persona=persona).exists()
