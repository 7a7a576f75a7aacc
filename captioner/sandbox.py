"""Decoding untrusted images in worker processes, each with a deadline and a memory limit.

    pool = DecodePool()                                   # starts WORKERS processes, once; reuse it
    pixels = pool.prepare_pixels(data, (224, 224))        # (224, 224, 3) uint8, or InvalidImageError
    caption = captioner.caption(pixels)
    pixels, display = pool.prepare_pixels_and_display(data, (224, 224), 768)   # and the photo to show, aspect kept

An image decoder is a large C library (libjpeg, libpng and zlib, libwebp, libtiff, libavif) reached
through Pillow, fed bytes chosen by whoever uploads. image.py bounds the costs we know of (pixels,
parts, scans, metadata); a worker process bounds the ones nobody knows yet. A decode that runs past
DECODE_DEADLINE_S is killed, one that crashes the decoder (a segfault, an abort) kills only its worker,
and one that asks for more than WORKER_MEMORY_BYTES gets a MemoryError: either way that one request
gets a sentence and a fresh worker takes the old one's place.

How the workers are built, and why:
* A worker is a fresh interpreter, `python -I captioner/sandbox.py` (the bottom of this file), started
  like multiprocessing's "spawn" start method: never a fork of the server with its threads and
  TensorFlow. Not multiprocessing itself, because its spawn and forkserver children re-run the parent's
  main script (`python app.py`: Gradio and TensorFlow, seconds and hundreds of MB per worker). A worker
  imports only the standard library, NumPy, Pillow and image.py (loaded from its file, so the
  `captioner` package and TensorFlow stay out). It starts in about 0.2 s, once, and is reused.
* Messages are length-prefixed bytes, never pickles: a worker taken over by a malicious file can't make
  the server run code by what it sends back, and its answer is checked (pixels of exactly the requested
  shape, or a short message).
* Inside the worker, after its imports: no core files, no files written, few file descriptors, an
  address-space limit, and an alarm that ends it if a decode outlives the deadline even when the
  server is gone.

Trusted input (training's features, batch jobs over one's own files) doesn't need any of this: the
library's `load_image` / `prepare_images` / `Captioner.caption(path)` decode in-process, as they
always have. Only the app routes requests through a pool.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

if __name__ != "__main__":  # in the worker (run as a script) image.py is loaded from its file instead
    from .image import MAX_FILE_BYTES, InvalidImageError

log = logging.getLogger(__name__)

# One worker per image the app reads at once: app.CONCURRENCY (2) single photos and one "Many photos" batch
# (app.BATCH_CONCURRENCY), so a request never waits for a worker. An idle worker holds about 40 MB.
WORKERS = 3
# The slowest legal file in tests/hostile_files.py (a 40-megapixel PNG) decodes in 1-2 s on the 2-core
# machine this was developed on, with another decode running; phone photos take 20-100 ms.
DECODE_DEADLINE_S = 3.0
# Address space per worker. The interpreter with NumPy and Pillow takes about 120 MB of it; the most
# demanding legal images (40 megapixels of 16-bit RGBA, composited over white) need 700 MB to 1 GB.
WORKER_MEMORY_BYTES = 1280 * 2**20
# A worker that never answers "ready" (a broken install, a machine swapping) fails the pool's start.
WORKER_START_TIMEOUT_S = 60.0
# A request waits this long for a free worker before it is told the server is busy.
WORKER_WAIT_S = 30.0
# Workers are recycled after this many decodes, so that leaks or fragmentation in C decoders can't build up.
MAX_JOBS_PER_WORKER = 1000
# Longest error message a worker may send; a longer one is a broken worker.
MAX_MESSAGE_BYTES = 2000
# Pipe buffers (Linux' unprivileged maximum): a photo goes over in one write and its pixels come back in one,
# instead of 64 KB at a time with a switch between the processes for each; on a busy CPU each switch costs.
PIPE_BYTES = 2**20

# Tests only: with this environment variable set to "1" when the pool starts, a worker that receives a
# file beginning with one of TEST_HOOKS aborts, hangs or allocates memory without end, standing in for a
# decoder bug. Never set in production; no real image begins with these bytes.
TEST_HOOKS_ENV = "CAPTIONER_DECODE_TEST_HOOKS"
TEST_HOOKS = {"abort": b"CAPTIONER-TEST-ABORT", "hang": b"CAPTIONER-TEST-HANG", "hog": b"CAPTIONER-TEST-HOG"}

SLOW_MESSAGE = "This file took too long to read; it may be damaged or crafted. Please try another image."
CRASH_MESSAGE = "This file crashed the image decoder; it may be damaged or crafted. Please try another image."
BUSY_MESSAGE = "The server is busy reading other images. Please try again in a moment."

# The wire format. Request: header (magic, width, height, display_max_side, length), then `length` bytes of
# the file. Answer: header (magic, status, length), then the pixels (OK) or a UTF-8 message (REFUSED); when a
# display copy was asked for (display_max_side > 0), the pixels are followed by DISPLAY_SIZE (its width and
# height) and its pixels.
REQUEST = struct.Struct(">4sIIII")
ANSWER = struct.Struct(">4sBI")
DISPLAY_SIZE = struct.Struct(">II")
# The largest display copy a caller may ask for (the heatmap view asks for 768): bounds what an answer may hold.
MAX_DISPLAY_SIDE = 2048
REQUEST_MAGIC, ANSWER_MAGIC, READY = b"DREQ", b"DANS", b"READY\n"
OK, REFUSED = 0, 1
WORKER_SCRIPT = Path(__file__).resolve()


class DecoderBusyError(RuntimeError):
    """No decode worker became free in time; the message is for the user."""


class _WorkerFailed(Exception):
    """The worker missed its deadline, died, or broke the protocol; `message` is for the user."""

    def __init__(self, message: str, reason: str):
        super().__init__(reason)
        self.message = message


class DecodePool:
    """WORKERS decode workers, started once and reused; `prepare_pixels` is thread-safe."""

    def __init__(self, workers: int = WORKERS, deadline_s: float = DECODE_DEADLINE_S,
                 memory_bytes: int = WORKER_MEMORY_BYTES, test_hooks: bool | None = None):
        if workers < 1 or deadline_s <= 0 or memory_bytes < 256 * 2**20:
            raise ValueError("a decode pool needs at least 1 worker, a positive deadline and at least 256 MB per worker")
        self.deadline_s, self.memory_bytes = deadline_s, memory_bytes
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1" if test_hooks is None else test_hooks
        self.replaced = 0  # workers killed or lost and replaced (timeouts, crashes), for tests and logs
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._closed = False
        for _ in range(workers):
            self._idle.put(self._start_worker())
        atexit.register(self.close)

    def wait_ready(self) -> "DecodePool":
        """Block until every idle worker has started (the app does this before it serves)."""
        workers = [self._idle.get() for _ in range(self._idle.qsize())]
        try:
            for worker in workers:
                worker.wait_ready()
        finally:
            for worker in workers:
                self._idle.put(worker)
        return self

    def prepare_pixels(self, data: bytes, size: tuple[int, int]) -> np.ndarray:
        """An image file's bytes -> (height, width, 3) uint8 pixels resized to `size` (width, height).

        Raises InvalidImageError (a sentence for the user) for anything the worker refuses, for a decode
        past the deadline and for a worker that dies; DecoderBusyError if no worker is free in time.
        """
        return self._decode(data, size, 0)[0]

    def prepare_pixels_and_display(self, data: bytes, size: tuple[int, int], display_max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (the pixels prepare_pixels gives, the photo to show: (h, w, 3) uint8 from the same decode, its
        orientation applied and its aspect kept, shrunk to at most display_max_side pixels a side, never enlarged)."""
        if type(display_max_side) is not int or not 0 < display_max_side <= MAX_DISPLAY_SIDE:
            raise ValueError(f"display_max_side must be a whole number from 1 to {MAX_DISPLAY_SIDE}")
        return self._decode(data, size, display_max_side)

    def _decode(self, data: bytes, size: tuple[int, int], display_max_side: int) -> tuple[np.ndarray, np.ndarray | None]:
        width, height = size
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"prepare_pixels takes the file's bytes, not {type(data).__name__}")
        if not data:
            raise InvalidImageError("The file is empty.")
        if len(data) > MAX_FILE_BYTES:
            raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
        worker = self._take_worker()
        try:
            worker.wait_ready()
        except _WorkerFailed as failure:  # not the file's fault: the server's
            self._replace(worker)
            raise RuntimeError(f"a decode worker {failure}") from None
        try:
            status, payload = worker.run(REQUEST.pack(REQUEST_MAGIC, width, height, display_max_side, len(data)), data,
                                         time.monotonic() + self.deadline_s, width * height * 3, display_max_side)
        except _WorkerFailed as failure:
            log.warning("Decode worker %d %s; starting another.", worker.pid, failure)
            self._replace(worker)
            raise InvalidImageError(failure.message) from None
        except BaseException:
            self._replace(worker)
            raise
        if worker.jobs >= MAX_JOBS_PER_WORKER:
            self._replace(worker, failed=False)
        else:
            self._idle.put(worker)
        if status == REFUSED:
            raise InvalidImageError(payload.decode("utf-8", "replace"))
        pixels = np.frombuffer(payload, np.uint8, count=width * height * 3).reshape(height, width, 3)
        if not display_max_side:
            return pixels, None
        display_width, display_height = DISPLAY_SIZE.unpack_from(payload, width * height * 3)
        display = np.frombuffer(payload, np.uint8, offset=width * height * 3 + DISPLAY_SIZE.size)
        return pixels, display.reshape(display_height, display_width, 3)

    def close(self) -> None:
        """Stop every worker. Safe to call twice; the pool can't be used afterwards."""
        with self._lock:
            self._closed = True
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(worker.pid for worker in self._workers)

    def _take_worker(self) -> "_Worker":
        deadline = time.monotonic() + WORKER_WAIT_S
        while True:
            try:
                worker = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DecoderBusyError(BUSY_MESSAGE) from None
            if worker.process.poll() is None:
                return worker
            # It died while idle (the OOM killer, a stray signal): not the next file's fault.
            log.warning("Decode worker %d died while idle; starting another.", worker.pid)
            self._replace(worker)

    def _start_worker(self) -> "_Worker":
        worker = _Worker(self.memory_bytes, self.deadline_s, self.test_hooks)
        with self._lock:
            if self._closed:
                worker.stop()
                raise RuntimeError("the decode pool is closed")
            self._workers.add(worker)
        return worker

    def _replace(self, worker: "_Worker", failed: bool = True) -> None:
        worker.stop()
        with self._lock:
            self._workers.discard(worker)
            self.replaced += failed
            if self._closed:
                return
        self._idle.put(self._start_worker())


class _Worker:
    """One worker process and its two pipes (raw file descriptors, so that poll() sees what's there)."""

    def __init__(self, memory_bytes: int, deadline_s: float, test_hooks: bool):
        # Nothing of the server's environment: no proxies, tokens or paths the decoder has no use for.
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}
        if test_hooks:
            env[TEST_HOOKS_ENV] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(WORKER_SCRIPT), str(memory_bytes), str(deadline_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, cwd="/", close_fds=True, bufsize=0,
        )
        self.pid = self.process.pid
        self.to_worker, self.from_worker = self.process.stdin.fileno(), self.process.stdout.fileno()
        os.set_blocking(self.to_worker, False)
        for pipe in (self.to_worker, self.from_worker):
            try:
                fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except (AttributeError, OSError):  # not Linux, or a lower pipe-max-size: the default 64 KB works too
                pass
        self.ready = False
        self.jobs = 0

    def wait_ready(self) -> None:
        if not self.ready:
            try:
                greeting = self._read(len(READY), time.monotonic() + WORKER_START_TIMEOUT_S)
            except _WorkerFailed as failure:
                raise _WorkerFailed(CRASH_MESSAGE, f"did not start: {failure}") from None
            if greeting != READY:
                raise _WorkerFailed(CRASH_MESSAGE, "did not start: a wrong greeting")
            self.ready = True

    def run(self, header: bytes, data: bytes, deadline: float, pixel_bytes: int, display_max_side: int = 0) -> tuple[int, bytes]:
        """Send one request and read its answer, all before `deadline` (monotonic)."""
        self.jobs += 1
        self._write(header, deadline)
        self._write(data, deadline)
        magic, status, length = ANSWER.unpack(self._read(ANSWER.size, deadline))
        if display_max_side:  # the pixels, the display copy's size, and at most a display_max_side square of pixels
            fits = pixel_bytes + DISPLAY_SIZE.size + 3 <= length <= pixel_bytes + DISPLAY_SIZE.size + 3 * display_max_side**2
        else:
            fits = length == pixel_bytes
        expected = magic == ANSWER_MAGIC and ((status == OK and fits) or (status == REFUSED and length <= MAX_MESSAGE_BYTES))
        if not expected:  # a worker that says anything else can't be trusted with another file
            raise _WorkerFailed(CRASH_MESSAGE, "broke the protocol")
        payload = self._read(length, deadline)
        if status == OK and display_max_side:
            display_width, display_height = DISPLAY_SIZE.unpack_from(payload, pixel_bytes)
            if not (0 < display_width <= display_max_side and 0 < display_height <= display_max_side
                    and length == pixel_bytes + DISPLAY_SIZE.size + 3 * display_width * display_height):
                raise _WorkerFailed(CRASH_MESSAGE, "broke the protocol")
        return status, payload

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            if not _ready(self.to_worker, select.POLLOUT, deadline):
                raise _WorkerFailed(SLOW_MESSAGE, "missed its deadline while taking the file")
            try:
                view = view[os.write(self.to_worker, view):]
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE: it died
                raise _WorkerFailed(CRASH_MESSAGE, f"died ({self._exit_status()}; {exc.strerror})") from None

    def _read(self, count: int, deadline: float) -> bytes:
        chunks, missing = [], count
        while missing:
            if not _ready(self.from_worker, select.POLLIN, deadline):
                raise _WorkerFailed(SLOW_MESSAGE, "missed its deadline")
            chunk = os.read(self.from_worker, min(missing, 1 << 20))
            if not chunk:
                raise _WorkerFailed(CRASH_MESSAGE, f"died ({self._exit_status()})")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def _exit_status(self) -> str:
        try:
            code = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _ready(fd: int, event: int, deadline: float) -> bool:
    """Wait until `fd` can be read or written (or has closed), at most until `deadline` (monotonic).

    poll(), not select(): a server holding many connections has file descriptors above select()'s 1024.
    """
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))


# ---- the worker process (python -I captioner/sandbox.py MEMORY_BYTES DEADLINE_S) ----------------------


def _worker_main(memory_bytes: int, deadline_s: float) -> None:
    import importlib.util
    import math
    import resource
    import signal

    # Answers go out on a private copy of stdout; fd 1 itself then points at stderr (/dev/null), so that
    # a library that prints can't corrupt the protocol.
    answers, requests = os.dup(1), sys.stdin.buffer.raw
    os.dup2(2, 1)

    spec = importlib.util.spec_from_file_location("captioner_image_worker", WORKER_SCRIPT.with_name("image.py"))
    image = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image)
    from PIL import Image

    Image.init()  # every format plugin (and its C module) imported now, before the limits below
    image.prepare_pixels(Image.new("RGB", (8, 8)), (4, 4))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
    # If the server is gone, nobody kills a worker stuck in a decode: SIGALRM's default action does.
    alarm_s = math.ceil(deadline_s) + 2

    def read_exactly(count: int) -> bytes | None:
        chunks, missing = [], count
        while missing:
            chunk = requests.read(missing)
            if not chunk:
                return None
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def answer(status: int, payload: bytes) -> None:
        view = memoryview(ANSWER.pack(ANSWER_MAGIC, status, len(payload)) + payload)
        while view:
            view = view[os.write(answers, view):]

    os.write(answers, READY)
    while True:
        header = read_exactly(REQUEST.size)
        if header is None:  # the server closed the pipe: done
            return
        magic, width, height, display_max_side, length = REQUEST.unpack(header)
        data = read_exactly(length) if magic == REQUEST_MAGIC else None
        if data is None:
            return
        signal.alarm(alarm_s)
        try:
            if test_hooks:
                _run_test_hook(data)
            photo = image.load_image(data, target_size=(width, height))
            pixels = image.resize_for_encoder(photo, (width, height)).tobytes()
            if display_max_side:
                display = image.display_copy(photo, display_max_side)
                pixels += DISPLAY_SIZE.pack(*display.size) + np.asarray(display, np.uint8).tobytes()
            del photo
            answer(OK, pixels)
        except image.InvalidImageError as exc:
            answer(REFUSED, str(exc)[:MAX_MESSAGE_BYTES // 4].encode())
        except MemoryError:
            answer(REFUSED, b"There isn't enough memory free to decode this image; please try a smaller one.")
        except Exception as exc:  # a decoder error image.py doesn't know
            answer(REFUSED, f"This image file is damaged and can't be read ({type(exc).__name__}).".encode())
        signal.alarm(0)
        del data


def _run_test_hook(data: bytes) -> None:
    if data.startswith(TEST_HOOKS["abort"]):
        os.abort()
    if data.startswith(TEST_HOOKS["hang"]):
        time.sleep(10**6)
    if data.startswith(TEST_HOOKS["hog"]):
        hoard = []
        while True:  # address space only (pages never touched): reaches the limit in microseconds
            hoard.append(np.empty(256 * 2**20, np.uint8))


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), float(sys.argv[2]))
