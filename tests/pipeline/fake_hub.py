"""A local stand-in for the Hugging Face Hub that the real huggingface_hub client downloads from.

It speaks the part of the Hub's protocol that `hf_hub_download` uses (huggingface_hub 2.x,
file_download.py and utils/_http.py):

- HEAD/GET `{endpoint}/{repo_id}/resolve/{revision}/{filename}`. A small file (a config) is answered
  there: 200, `ETag` its git blob sha1, `Content-Length`, `X-Repo-Commit`. A weights file (LFS on the
  Hub) is redirected: 302 to a CDN with `Location`, and the metadata in `X-Linked-Etag` (its sha256),
  `X-Linked-Size` and `X-Repo-Commit`, as the Hub does.
- The CDN is a second server, on another port: another origin, so the client stops at the redirect
  and reads the metadata there (as it does for huggingface.co's CDN), then GETs the Location. It
  honours `Range` (the client resumes a broken download with one).
- No `X-Xet-*` header: the client downloads over plain HTTP even where hf_xet is installed.

A test sets the bytes each file serves (`files`), may cut a file's body short (`cut_at`: the
response still announces the whole length, then the connection closes), and reads `requests`.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin", ".ckpt")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha256>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-$")


def commit_of(repo_id: str) -> str:
    """A repository's (made-up) head commit: 40 hex digits, as X-Repo-Commit carries."""
    return hashlib.sha1(f"commit of {repo_id}".encode()).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The Hub's ETag of a file kept in git: the sha1 of its git blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Request:
    server: str  # "hub" | "cdn"
    method: str
    repo_id: str | None
    filename: str | None
    range: str | None


@dataclass
class FakeHub:
    files: dict[tuple[str, str], bytes]  # (repo_id, filename) -> the bytes served now
    cut_at: dict[tuple[str, str], int] = field(default_factory=dict)  # bytes sent before hanging up
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers = [
            ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub")),
            ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn")),
        ]
        for server in self._servers:
            server.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self._servers]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_port}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_port}"

    def downloads(self) -> list[tuple[str, str]]:
        """(repo_id, filename) of every body requested, from the Hub or from the CDN, in order."""
        return [(r.repo_id, r.filename) for r in self.requests if r.method == "GET"]

    def __enter__(self) -> FakeHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _by_sha256(self, sha256: str) -> tuple[tuple[str, str], bytes] | None:
        with self._lock:
            return next(((k, v) for k, v in self.files.items() if hashlib.sha256(v).hexdigest() == sha256), None)


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, *args) -> None:  # quiet: the test reads hub.requests
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if role == "hub":
                match = _RESOLVE.match(path)
                key = (match["repo"], match["filename"]) if match else None
                revision_ok = match is not None and match["revision"] in ("main", commit_of(match["repo"]))
            else:
                match = _CDN.match(path)
                found = hub._by_sha256(match["sha256"]) if match else None
                key, revision_ok = (found[0] if found else None), True
            hub._record(Request(role, self.command, *(key or (None, None)), self.headers.get("Range")))
            with hub._lock:
                data = hub.files.get(key) if key else None
                cut = hub.cut_at.get(key) if key else None
            if data is None or not revision_ok:
                headers = {"X-Error-Code": "EntryNotFound" if revision_ok else "RevisionNotFound"}
                if key:
                    headers["X-Repo-Commit"] = commit_of(key[0])
                return self._send(404, headers, b"not found", body)
            if role == "hub" and key[1].endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(data).hexdigest()
                return self._send(302, {
                    "Location": f"{hub.cdn}/cdn/{sha256}",
                    "X-Repo-Commit": commit_of(key[0]),
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "ETag": f'"{git_blob_sha1(data)}"',  # the pointer file's, as on the Hub
                }, b"", body)
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if role == "hub":
                headers |= {"X-Repo-Commit": commit_of(key[0]), "ETag": f'"{git_blob_sha1(data)}"'}
            start, status = 0, 200
            if body and (wanted := _RANGE.match(self.headers.get("Range", ""))):
                start, status = min(int(wanted["start"]), len(data)), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            sent = data[start:] if cut is None else data[start:max(start, cut)]
            self._send(status, headers, data[start:], body, sent=sent)

        def _send(self, status: int, headers: dict, content: bytes, body: bool, sent: bytes | None = None):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body:
                self.wfile.write(content if sent is None else sent)
            if body and sent is not None and len(sent) < len(content):
                self.wfile.flush()
                self.close_connection = True  # hang up mid-body: the announced length never arrives

    return Handler
