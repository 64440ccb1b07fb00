"""Benchmark: uploads against the real web server, as `make run` serves it (granian, one process).

Run from the repository root: `python bench/uploads.py [--smoke] [--people N]`.

1. A burst: N people sign up, agree, make a double, then all send 20 photos in one request each at
   the same moment (as the page's script sends them), on SQLite and on PostgreSQL (when one
   answers at --postgres; a throw-away database is made and dropped). Counts answers of 5xx,
   photos lost (sent, not refused as a file, and with no row) and photos left "being checked",
   and the 95th percentile of the requests' times. No worker runs: nothing may rely on one.
2. The corpus: hostile and costly files, each sent alone to a fresh double after a warm-up
   upload; the web server's CPU time (all its processes) for each request, and the largest.
3. Large bodies: one declared past the limit (REQUEST_MAX_BYTES, 20 x PHOTO_MAX_MB + 1 MiB), one
   without a length (chunked) that goes on past it, and a signed-in 300 MB upload of one file,
   which is under the limit (20 x 15 MiB is 315 MB) and so read, then refused by the form. Each
   with the time to the answer and the web server's peak memory growth (RSS, sampled every 20 ms).

Goals (issue 24): 0 x 5xx, 0 good photos lost, 0 left pending, <= 2 s CPU for any one file, a body
past the limit answered 413 within 1 s with the web server growing < 100 MB. The last line holds
the figures. `--smoke`: 2 people x 5 photos, SQLite only, a short corpus (well under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import secrets
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import psutil
import requests
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_SETTINGS_DIR = tempfile.TemporaryDirectory(prefix="photobooth-bench-settings-")  # settings make DATA_DIR
os.environ.setdefault("DATA_DIR", _SETTINGS_DIR.name)

from photobooth import settings as site_settings  # noqa: E402  (a plain module: the limits)
from photobooth.dev import RedisServer, free_port, web_server_command  # noqa: E402

FACES = Path(os.environ.get("PHOTOBOOTH_FACES_DIR", REPO.parent / "shared" / "faces"))
PYTHON = sys.executable
PASSWORD = "bench-" + secrets.token_hex(8)


# Files.

def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def face(name: str) -> Image.Image:
    return Image.open(FACES / name).convert("RGB")


def person_photos(count: int) -> list[tuple[str, bytes]]:
    """`count` distinct files of one person: five different photos of Obama (as the tests' double),
    then each mirrored, zoomed in and brightened; the variants are near-duplicates, and each file
    gets its own verdict."""
    bases = [(name, face(name)) for name in ("obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg")]
    bases.append(("obama-cropped.jpg", face("obama_and_biden.jpg").crop((1002, 242, 1482, 722))))
    photos = [(name, encoded(image, "JPEG", quality=92)) for name, image in bases]
    for change, alter in (
        ("mirrored", ImageOps.mirror),
        ("zoomed", lambda image: ImageOps.crop(image, (image.width // 12, image.height // 12))),
        ("brighter", lambda image: image.point(lambda value: min(255, int(value * 1.15)))),
    ):
        photos += [(f"{change}-{name}", encoded(alter(image), "JPEG", quality=92)) for name, image in bases]
    return photos[:count]


def scan_bomb(size: tuple[int, int], scans: int) -> bytes:
    """A flat progressive JPEG whose last scan is repeated to `scans` scans."""
    data = encoded(Image.new("L", size, 128), "JPEG", progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def corpus(smoke: bool) -> list[tuple[str, bytes]]:
    """Files a person or an attacker may send; the costliest ones the checks accept among them."""
    small = face("obama_small.jpg")
    junk_profile = PngInfo()
    junk_profile.add_text("Raw profile type exif", "\nexif\n      24\nthis is not hexadecimal\n")
    files = [
        ("obama.jpg", (FACES / "obama.jpg").read_bytes()),
        ("scan-bomb-2000-scans.jpg", scan_bomb((3000, 3000), 2000)),
        ("progressive-100-scans-6mp.jpg", scan_bomb((2440, 2440), 100)),  # at the decoding budget
    ]
    if smoke:
        return files
    return files + [
        ("face-48mp.jpg", encoded(face("obama.jpg").resize((6188, 7732)), "JPEG", quality=90)),
        ("png-bomb-900mp.png", encoded(Image.new("1", (30_000, 30_000)), "PNG")),
        ("100mp.png", encoded(Image.new("L", (10_000, 10_000)), "PNG")),
        ("bad-exif.jpg", encoded(small, "JPEG", exif=b"Exif\x00\x00JUNKJUNKJUNK")),
        ("bad-exif.png", encoded(small, "PNG", exif=b"JUNKJUNKJUNK")),
        ("junk-raw-profile.png", encoded(small, "PNG", pnginfo=junk_profile)),
        ("mpo.jpg", encoded(small, "MPO", save_all=True, append_images=[face("obama1.jpg")])),
        ("sliver-8000x2.png", encoded(Image.new("RGB", (8000, 2)), "PNG")),
        ("truncated.jpg", (FACES / "obama.jpg").read_bytes()[:40_000]),
        ("长" * 500 + ".jpg", (FACES / "obama1.jpg").read_bytes()),  # sent raw, as without JavaScript
    ]


# Databases.

class Database:
    """A throw-away database: its DATABASE_URL for the site, and queries for the bench."""

    def __init__(self, kind: str, folder: Path, postgres: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.path = folder / "bench.sqlite3"
            self.url = f"sqlite:///{self.path}"
        else:
            self.admin = postgres
            self.name = f"photobooth_bench_{os.getpid()}"
            self._admin(f'CREATE DATABASE "{self.name}"')
            self.url = urllib.parse.urlunsplit(urllib.parse.urlsplit(postgres)._replace(path="/" + self.name))

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as connection:
            connection.execute(statement)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as connection:
                return connection.execute(sql, params).fetchall()
        import psycopg

        with psycopg.connect(self.url) as connection:
            return connection.execute(sql.replace("?", "%s"), params).fetchall()

    def drop(self) -> None:
        if self.kind == "postgres":
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def postgres_answers(url: str) -> bool:
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
        return True
    except Exception:
        return False


# The site.

class Site:
    """The web server as `make run` starts it, on one database, a private Redis and data folder."""

    def __init__(self, database: Database, folder: Path, redis_url: str) -> None:
        self.env = {**os.environ, "DATABASE_URL": database.url, "DATA_DIR": str(folder), "REDIS_URL": redis_url,
                    "LOG_LEVEL": "WARNING"}
        subprocess.run([PYTHON, "manage.py", "migrate", "--noinput"], cwd=REPO, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / "server.log", "wb")
        command = [part for part in web_server_command(self.port) if part != "--access-log"]
        self.process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/signup/", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError(f"the web server did not start; see {folder / 'server.log'}") from None
                time.sleep(0.3)

    def processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.process.pid)
        return [main, *main.children(recursive=True)]

    def rss(self) -> int:
        return sum(process.memory_info().rss for process in self.processes())

    def cpu_s(self) -> float:
        return sum(process.cpu_times().user + process.cpu_times().system for process in self.processes())

    def person(self, name: str) -> tuple[requests.Session, int]:
        """Signs a new person up through the pages; returns their session and a consented double."""
        session = requests.Session()
        session.get(self.url + "/signup/", timeout=30)
        self.post(session, "/signup/", {"username": name, "email": f"{name}@example.com",
                                        "password1": PASSWORD, "password2": PASSWORD})
        made = self.post(session, "/personas/new/", {"name": "Me"})
        persona_id = int(made.headers["Location"].rstrip("/").rsplit("/", 1)[-1])
        self.post(session, f"/personas/{persona_id}/consent/", {"agree": "on"})
        return session, persona_id

    def post(self, session: requests.Session, path: str, data=None, files=None, headers=None,
             timeout: float = 30) -> requests.Response:
        headers = {"X-CSRFToken": session.cookies.get("csrftoken", ""), **(headers or {})}
        response = session.post(self.url + path, data=data, files=files, headers=headers, allow_redirects=False,
                                timeout=timeout)
        if response.status_code >= 500:
            return response
        if response.status_code not in (200, 302, 400):
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:300]}")
        return response

    def upload(self, session: requests.Session, persona_id: int, photos: list[tuple[str, bytes]],
               raw_names: bool = False) -> requests.Response:
        """As upload.js sends: each file under a short safe name, its own in `names`; or, like a
        browser without JavaScript, the raw names."""
        if raw_names:
            return self.post(session, f"/personas/{persona_id}/photos/", timeout=600,
                             files=[("photos", (name, data)) for name, data in photos])
        files = [("photos", (f"photo-{index}{Path(name).suffix.lower()}", data))
                 for index, (name, data) in enumerate(photos, 1)]
        return self.post(session, f"/personas/{persona_id}/photos/", data={"names": [name for name, _ in photos]},
                         files=files, headers={"HX-Request": "true"}, timeout=600)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def photo_statuses(database: Database, persona_ids: list[int]) -> dict[str, int]:
    marks = ",".join("?" * len(persona_ids))
    rows = database.query(f"SELECT status, COUNT(*) FROM studio_photo WHERE persona_id IN ({marks}) GROUP BY status",
                          tuple(persona_ids))
    return dict(rows)


# 1. The burst.

def percentile(values: list[float], share: float) -> float:
    """Nearest rank: the smallest value at least `share` of the values do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * share) - 1)] if ordered else 0.0


def burst(site: Site, database: Database, people: int, photos: list[tuple[str, bytes]]) -> dict:
    persons = [site.person(f"{database.kind}-{index}-{secrets.token_hex(3)}") for index in range(people)]
    start = threading.Barrier(people)
    results: list[tuple[int, float]] = [(0, 0.0)] * people

    def send(index: int) -> None:
        session, persona_id = persons[index]
        start.wait()
        started = time.perf_counter()
        try:
            status = site.upload(session, persona_id, photos).status_code
        except requests.RequestException:
            status = 599  # no answer at all
        results[index] = (status, time.perf_counter() - started)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(people)]
    cpu_before, started = site.cpu_s(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, server_cpu = time.perf_counter() - started, site.cpu_s() - cpu_before
    statuses = photo_statuses(database, [persona_id for _, persona_id in persons])
    stored = sum(statuses.values())
    times = [elapsed for _, elapsed in results]
    return {
        "database": database.kind, "requests": people, "photos": people * len(photos),
        "5xx": sum(status >= 500 for status, _ in results), "stored": stored,
        "lost": people * len(photos) - stored, "pending": statuses.get("pending", 0),
        "accepted": statuses.get("accepted", 0), "refused": statuses.get("rejected", 0),
        "p50_s": percentile(times, 0.5), "p95_s": percentile(times, 0.95), "wall_s": wall,
        "server_cpu_s": server_cpu,
    }


# 2. CPU per file.

def verdict(database: Database, persona_id: int, status: int) -> str:
    rows = database.query("SELECT status, reason_code FROM studio_photo WHERE persona_id = ?", (persona_id,))
    if not rows:
        return f"HTTP {status}, refused as a file" if status < 400 else f"HTTP {status}, request refused"
    return ", ".join(f"{state} {reason}".strip() for state, reason in rows)


def cpu_per_file(site: Site, database: Database, files: list[tuple[str, bytes]]) -> list[dict]:
    session, persona_id = site.person(f"warm-{secrets.token_hex(3)}")
    site.upload(session, persona_id, [("warm-up.jpg", (FACES / "obama1.jpg").read_bytes())])  # loads the models
    rows = []
    for name, data in files:
        session, persona_id = site.person(f"file-{secrets.token_hex(3)}")
        raw = len(name) > 100
        before, started = site.cpu_s(), time.perf_counter()
        status = site.upload(session, persona_id, [(name, data)], raw_names=raw).status_code
        rows.append({"file": name if len(name) < 40 else f"{name[:3]}… ({len(name)} characters, raw)",
                     "bytes": len(data), "cpu_s": site.cpu_s() - before, "wall_s": time.perf_counter() - started,
                     "verdict": verdict(database, persona_id, status)})
    return rows


# 3. Large bodies.

class MemoryWatch:
    """The web server's peak RSS growth while in use, sampled every 20 ms."""

    def __init__(self, site: Site) -> None:
        self.site, self.before = site, site.rss()
        self.peak = self.before
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.site.rss())

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 2**20


def send_body(site: Site, head: str, blocks, total_label: str, over_limit: bool) -> dict:
    """Sends a request's head, then its body block by block as a browser does, stopping when the
    server answers (or closes); the time is from the first byte to the answer's end."""
    with MemoryWatch(site) as memory, socket.create_connection(("127.0.0.1", site.port)) as connection:
        connection.settimeout(60)
        started = time.perf_counter()
        connection.sendall(head.encode())
        sent = 0
        for block in blocks:
            if select.select([connection], [], [], 0)[0]:
                break
            try:
                connection.sendall(block)
            except OSError:
                break
            sent += len(block)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer and (chunk := connection.recv(65536)):
                answer += chunk
        elapsed = time.perf_counter() - started
        time.sleep(0.3)  # what the server still does after answering shows in the peak too
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "none"
    return {"body": total_label, "over_limit": over_limit, "status": status, "answer_s": elapsed, "sent_mb": sent / 1e6,
            "rss_growth_mb": memory.growth_mb}


def large_bodies(site: Site, smoke: bool) -> list[dict]:
    limit = site_settings.REQUEST_MAX_BYTES
    block = b"\0" * 2**20
    common = f"Host: 127.0.0.1:{site.port}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    declared = limit + 2**20
    rows = [send_body(site, f"POST /personas/1/photos/ HTTP/1.1\r\n{common}Content-Length: {declared}\r\n\r\n",
                      (block for _ in range(declared // len(block))), f"{declared / 1e6:.0f} MB, declared", True)]
    chunk = f"{len(block):x}\r\n".encode() + block + b"\r\n"
    rows.append(send_body(site, f"POST /personas/1/photos/ HTTP/1.1\r\n{common}Transfer-Encoding: chunked\r\n\r\n",
                          (chunk for _ in range(400)), "400 MB, chunked", True))
    if smoke:
        return rows
    # 300 MB of one file from a signed-in person: under the limit, so read (streamed), then refused.
    session, persona_id = site.person(f"big-{secrets.token_hex(3)}")
    size = 300_000_000
    opening = b'--b\r\nContent-Disposition: form-data; name="photos"; filename="big.jpg"\r\n\r\n'
    closing = b"\r\n--b--\r\n"
    filler = size - len(opening) - len(closing)
    cookies = "; ".join(f"{key}={value}" for key, value in session.cookies.items())
    head = (f"POST /personas/{persona_id}/photos/ HTTP/1.1\r\n{common}Content-Length: {size}\r\n"
            f"Cookie: {cookies}\r\nX-CSRFToken: {session.cookies['csrftoken']}\r\nHX-Request: true\r\n\r\n")
    blocks = [opening, *(block for _ in range(filler // len(block))), block[: filler % len(block)], closing]
    rows.append(send_body(site, head, iter(blocks), "300 MB, one file, signed in", False))
    return rows


# The report.

def table(rows: list[dict], columns: list[str]) -> None:
    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    widths = [max(len(column), *(len(cell(row[column])) for row in rows)) for column in columns]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row[column]).ljust(width) for column, width in zip(columns, widths)))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 people x 5 photos, SQLite, a short corpus")
    parser.add_argument("--people", type=int, default=5)
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL server's admin URL: a throw-away database is made there")
    args = parser.parse_args()
    people, count = (2, 5) if args.smoke else (args.people, args.photos)
    kinds = ["sqlite"] if args.smoke or not postgres_answers(args.postgres) else ["sqlite", "postgres"]
    photos = person_photos(count)
    print(f"web server: {' '.join(web_server_command('PORT')[2:])}; limit {site_settings.REQUEST_MAX_BYTES} bytes; "
          f"{people} people x {count} photos at once on {', '.join(kinds)}\n")

    redis = RedisServer()
    bursts, files, bodies = [], [], []
    try:
        for kind in kinds:
            folder = Path(tempfile.mkdtemp(prefix=f"photobooth-bench-{kind}-"))
            database = Database(kind, folder, args.postgres)
            site = None
            try:
                site = Site(database, folder, redis.url)
                bursts.append(burst(site, database, people, photos))
                if kind == "sqlite":
                    files = cpu_per_file(site, database, corpus(args.smoke))
                    bodies = large_bodies(site, args.smoke)
            finally:
                if site:
                    site.stop()
                database.drop()
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        redis.stop()

    table(bursts, ["database", "requests", "photos", "5xx", "stored", "lost", "pending", "accepted", "refused",
                   "p50_s", "p95_s", "wall_s", "server_cpu_s"])
    table(files, ["file", "bytes", "cpu_s", "wall_s", "verdict"])
    table(bodies, ["body", "over_limit", "status", "answer_s", "sent_mb", "rss_growth_mb"])
    over = [row for row in bodies if row["over_limit"]]
    print(
        f"five_xx={sum(row['5xx'] for row in bursts)} lost={sum(row['lost'] for row in bursts)} "
        f"pending={sum(row['pending'] for row in bursts)} "
        + " ".join(f"p95_{row['database']}_s={row['p95_s']:.2f}" for row in bursts)
        + f" max_file_cpu_s={max(row['cpu_s'] for row in files):.2f}"
        f" over_limit={len(over)} over_limit_413={sum(row['status'] == '413' for row in over)}"
        f" over_limit_answer_s={max(row['answer_s'] for row in over):.2f}"
        f" max_rss_growth_mb={max(row['rss_growth_mb'] for row in bodies):.0f}"
    )


if __name__ == "__main__":
    main()
