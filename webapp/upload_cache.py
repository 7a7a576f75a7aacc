"""Gradio's upload cache, bounded: at most MAX_CACHE_BYTES on disk, each client's share bounded, every file
deleted by its age.

Gradio's own cleanup (Blocks(delete_cache=...)) deletes only the files it listed as uploaded: the parts of
an upload that failed after they were written stay forever, and nothing bounds the total. Here:

- `charge(client, n)` is called as each upload's bytes arrive (and for data: URL images stored as uploads): it
  refuses them when the cache would pass UPLOAD_SHARE of MAX_CACHE_BYTES (the rest is room for outputs), or the
  client would have stored more than MAX_CLIENT_BYTES within the last MAX_AGE_S (what it stored is deleted by then).
  Gradio's copies of outputs (heatmaps, galleries) come into the cache uncharged, so once the count nears the bound
  it is checked against the disk (at most every RECOUNT_EVERY_S): the disk's total, when larger, is the count.
- `sweep()`, every SWEEP_EVERY_S in a thread (and soon after an upload fails): deletes every file older than
  MAX_AGE_S anywhere in the cache (uploads, stored images, Gradio's copies of outputs), and files at the
  cache's top level (where Gradio writes an upload's parts before moving them into place) that no request
  has open and that are older than ORPHAN_AGE_S: what failed uploads left. Then it measures the cache again.
  A file's age is the time since it came into the cache (the later of its mtime and ctime: Gradio copies files
  with their original's mtime). The app's own files (`keep`: the example photos Gradio copied there when the
  page was built) are never deleted: the page links them for as long as it runs.

`CAPTIONER_UPLOAD_CACHE_MB` sets MAX_CACHE_BYTES (the operator's disk; tests use a small cache).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# ---- limits ---------------------------------------------------------------------------------------

# A Space's disk is tens of GB; 4 GB of uploads is 16 full "Many photos" uploads (50 photos of 5 MB) an hour.
MAX_CACHE_BYTES = int(float(os.environ.get("CAPTIONER_UPLOAD_CACHE_MB", "4096")) * 2**20)
# One client's uploads within MAX_AGE_S: a quarter of the cache, so that no one client can fill it.
MAX_CLIENT_BYTES = MAX_CACHE_BYTES // 4
# Uploads (and everything else in the cache) are deleted an hour after they were written: long enough for a
# user to send an uploaded photo again with other settings.
MAX_AGE_S = 3600
SWEEP_EVERY_S = 60
# An upload's parts are written at the cache's top level and moved into place when it succeeds, just after
# the answer is sent; a top-level file no request has had open for this long is what a failed upload left.
ORPHAN_AGE_S = 10
# Past this share of the bound, a charge first counts the disk (at most every RECOUNT_EVERY_S, a walk of the
# cache in the event loop): what the outputs written since the last sweep add is then counted before uploads fill
# the rest. A fill otherwise passed the bound by the outputs of the requests just before it (2.5 MB in a test).
RECOUNT_FROM_SHARE = 0.75
RECOUNT_EVERY_S = 1.0
# Uploads may fill this share of the bound; the rest is room for the outputs Gradio writes uncharged between two
# recounts. Without it, six clients filling the cache passed the bound by 25 KB (on a machine running two test suites).
UPLOAD_SHARE = 0.98

CACHE_FULL = "The server has no room for more uploads just now. Please try again in a few minutes."
CLIENT_FULL = ("You have uploaded more than {mb} MB in the last hour, this server's limit per user. "
               "Please try again later.")


class CacheFull(Exception):
    """Uploads refused for lack of room; the message is for the user, the status for HTTP."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UploadCache:
    """See the module doc. Thread-safe: charge() runs in the event loop, sweep() in its own thread."""

    def __init__(self, folder: Callable[[], Path], max_bytes: int = MAX_CACHE_BYTES,
                 client_bytes: int = MAX_CLIENT_BYTES, max_age_s: float = MAX_AGE_S, keep: frozenset[str] = frozenset()):
        self.folder, self.max_bytes, self.client_bytes, self.max_age_s = folder, max_bytes, client_bytes, max_age_s
        self.upload_bytes = int(UPLOAD_SHARE * max_bytes)  # what uploads may fill (UPLOAD_SHARE)
        self.keep = frozenset(os.path.realpath(path) for path in keep)
        self._lock = threading.Lock()
        self._used = 0  # bytes on disk at the last sweep, plus bytes charged since
        self._charged_during_sweep = 0  # bytes charged since the running sweep began (it may not have seen them)
        self._stored: dict[str, deque[tuple[float, int]]] = defaultdict(deque)  # client -> (time, bytes) charged
        self._recounted_at = -RECOUNT_EVERY_S  # (time.monotonic) when a charge last counted the disk
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> UploadCache:
        """Measure the cache, then sweep it every SWEEP_EVERY_S (and when asked) in a daemon thread."""
        self.sweep()
        self._thread = threading.Thread(target=self._run, name="upload-cache-sweeper", daemon=True)
        self._thread.start()
        return self

    @property
    def used(self) -> int:
        return self._used

    def charge(self, client: str, count: int) -> None:
        """Count `count` bytes about to be written for `client`; CacheFull if there's no room for them."""
        now = time.monotonic()
        with self._lock:
            stored = self._stored[client]
            while stored and now - stored[0][0] > self.max_age_s:
                stored.popleft()
            if sum(size for _, size in stored) + count > self.client_bytes:
                raise CacheFull(CLIENT_FULL.format(mb=self.client_bytes // 2**20), 429)
            if self._used + count > RECOUNT_FROM_SHARE * self.max_bytes and now - self._recounted_at >= RECOUNT_EVERY_S:
                self._recounted_at = now
                # Never lower: bytes charged may not have reached the disk yet (the sweep releases what's gone).
                self._used = max(self._used, disk_bytes(self.folder()))
            if self._used + count > self.upload_bytes:
                self._wake.set()  # a sweep may find room (orphans, old files) for the next request
                raise CacheFull(CACHE_FULL, 503)
            self._used += count
            self._charged_during_sweep += count
            if stored and now - stored[-1][0] < 1.0:  # one entry per second and client, however small the chunks
                stored[-1] = (stored[-1][0], stored[-1][1] + count)
            else:
                stored.append((now, count))

    def upload_failed(self) -> None:
        """An upload ended in an error: its parts may be orphans; sweep once they're old enough to tell."""
        threading.Timer(ORPHAN_AGE_S + 1, self._wake.set).start()

    def _run(self) -> None:
        while True:
            self._wake.wait(SWEEP_EVERY_S)
            self._wake.clear()
            try:
                self.sweep()
            except Exception:  # a file vanishing mid-walk and the like: the next sweep tries again
                log.exception("Sweeping the upload cache failed")

    def sweep(self) -> int:
        """Delete expired files and orphans (see the module doc); -> bytes left in the cache."""
        folder = self.folder()
        now, open_files = time.time(), _open_files()
        with self._lock:
            self._charged_during_sweep = 0
        measured = 0
        for directory, _, files in os.walk(folder, topdown=False):
            top = Path(directory) == folder
            for name in files:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                    age = now - max(info.st_mtime, info.st_ctime)
                    orphan = top and age > ORPHAN_AGE_S and path not in open_files
                    if (age > self.max_age_s or orphan) and path not in self.keep:
                        os.unlink(path)
                    else:
                        measured += info.st_size
                except FileNotFoundError:
                    continue
            if not top and not os.listdir(directory):
                try:
                    if now - os.stat(directory).st_mtime > ORPHAN_AGE_S:  # not one an upload is about to fill
                        os.rmdir(directory)
                except OSError:
                    pass
        with self._lock:
            # Uploads charged while the walk ran may have reached the disk after it passed: count them again
            # (twice at worst, for a moment), never not at all.
            self._used = measured + self._charged_during_sweep
        return measured


def disk_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` now."""
    total = 0
    for directory, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                continue
    return total


def _open_files() -> set[str]:
    """Paths this process has open now (Linux /proc); empty elsewhere, where only age tells orphans apart."""
    paths = set()
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                paths.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return paths
