"""Run `app.py` as a real server in a subprocess, for benchmarks and tests.

    from benchmarks.app_process import running_app

    with running_app(weights_dir) as url:   # e.g. "http://127.0.0.1:51234"
        Client(url).predict(handle_file("examples/dog.jpg"), "beam", 5, api_name="/caption")

Each server gets its own upload cache (GRADIO_TEMP_DIR, a fresh temporary folder: `AppProcess.upload_dir`),
so that servers running side by side never see each other's uploads. `event_result` reads a raw-HTTP call's
answer (POST /gradio_api/call/API, then its event stream), as the security tests and benchmarks/attack.py do.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppProcess:
    url: str
    process: subprocess.Popen
    startup_seconds: float  # from starting the process to its first answer
    output: IO[bytes]
    upload_dir: Path  # Gradio's upload cache for this server

    def output_tail(self, chars: int = 6000) -> str:
        self.output.flush()
        self.output.seek(0)
        return self.output.read().decode(errors="replace")[-chars:]


@contextlib.contextmanager
def running_app(weights_dir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                port: int | None = None, timeout: float = 90.0):
    """Start `python app.py --weights DIR --host 127.0.0.1 --port P`; yield its base URL once it answers."""
    with app_process(weights_dir, env, port, timeout) as app:
        yield app.url


@contextlib.contextmanager
def app_process(weights_dir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                port: int | None = None, timeout: float = 90.0):
    """Like running_app, but yields an AppProcess (for benchmarks that watch the process too).

    Without weights_dir the app loads what it would by default ($CAPTIONER_REPO, else weights/).
    `env` adds to (or overrides) this process's environment (GRADIO_TEMP_DIR included). The server is stopped
    on exit, and its upload cache deleted.
    Raises RuntimeError with the server's output if it exits or doesn't answer within `timeout` seconds.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    if weights_dir is not None:
        command += ["--weights", str(weights_dir)]
    # Output goes to a file, not a pipe: nobody reads a pipe while the server runs, and a full pipe blocks it.
    with tempfile.TemporaryFile() as output, tempfile.TemporaryDirectory(prefix="gradio-uploads-") as uploads:
        # No usage analytics or version checks: they are network calls that tests must not wait on.
        full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
                    "GRADIO_TEMP_DIR": uploads, **(env or {})}
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=output, stderr=subprocess.STDOUT)
        app = AppProcess(url, process, 0.0, output, Path(full_env["GRADIO_TEMP_DIR"]).resolve())
        try:
            while not _answers(url):
                if process.poll() is not None:
                    raise RuntimeError(f"{' '.join(command)} exited with code {process.returncode} before serving. "
                                       f"Its output:\n{app.output_tail()}")
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"{' '.join(command)} did not answer at {url} within {timeout:.0f} s. "
                                       f"Its output:\n{app.output_tail()}")
                time.sleep(0.5)
            app.startup_seconds = time.monotonic() - started
            yield app
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def event_result(http, api: str, event_id: str) -> tuple[str, object]:
    """Read the event stream of call `event_id` to API (an httpx client on .../gradio_api) to its result:
    -> ("complete", the outputs) or ("error", the error's message, None if the app gave none)."""
    kind = None
    with http.stream("GET", f"/call/{api}/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                value = json.loads(line[5:])
                if kind == "error":
                    value = value.get("error") if isinstance(value, dict) else value
                return kind, value
    raise RuntimeError("the event stream ended without a result")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
