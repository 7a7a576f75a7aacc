"""`RequestLimits`, an ASGI middleware in front of Gradio: what reaches Gradio at all.

Everything a request carries is hostile until checked: its size, its pace, its shape, every path and
string in it. Some of Gradio's own work happens before the app's function runs (it copies or downloads
the files a payload names, validates file objects, keeps each session's inputs in memory), so the limits
must apply before it: a body size per route, a minimum upload rate, a bound on files per upload, and for
event calls a parsed, checked payload (short strings; files only from the upload cache; data: URLs turned
into uploaded files; a short argument list filled with None; every refusal a sentence).

`launch_options()`, `BLOCKS_OPTIONS` and `QUEUE_OPTIONS` are the Gradio settings that go with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from .uploads import (
    DATA_URL_TOO_BIG,
    MAX_DATA_URL_CHARS,
    MAX_TEXT_CHARS,
    NOT_A_FILE,
    RequestError,
    decode_data_url,
    for_log,
    resolve_upload,
    upload_folder,
)

log = logging.getLogger(__name__)

# ---- limits ---------------------------------------------------------------------------------------

# Request bodies. An event call is JSON: a few settings and file references, or one data: URL image.
MAX_EVENT_BODY_BYTES = MAX_DATA_URL_CHARS + 64 * 1024
# One upload request: the page's "Many photos" view sends all its photos at once, phone photos of up to about
# 5 MB each; the app passes its own number in (launch_options). Gradio writes uploads to disk as they arrive, not to memory.
MAX_FILES_PER_UPLOAD = 50
MAX_UPLOAD_BODY_BYTES = 256 * 2**20
# Any other request (Gradio's small JSON routes: cancel, reset, component server, login, ...).
MAX_OTHER_BODY_BYTES = 64 * 1024
# Event bodies are read whole into memory to be checked: at most this much at once (four data: URL images;
# parsing takes two or three times as much for a moment). Beyond it a request is refused as busy (503).
MAX_BUFFERED_EVENT_BYTES = 4 * MAX_EVENT_BODY_BYTES
# A body must arrive at MIN_BODY_RATE bytes/s on average once BODY_GRACE_S have passed, or the request
# ends with 408: a 20 MB photo may take 10 minutes at that pace, while a client sending a byte every few
# seconds is answered after BODY_GRACE_S (within the 5 s any request gets an answer in).
MIN_BODY_RATE = 32 * 1024
BODY_GRACE_S = 4.0
# In an event payload: the most JSON values (counted as commas and brackets, before parsing) and the
# deepest nesting (its strings: uploads.MAX_TEXT_CHARS).
MAX_JSON_VALUES = 10_000
MAX_JSON_DEPTH = 32
# Gradio keeps every session's component values (inputs included) in memory, by default for the last
# 10,000 sessions; with short strings and file references a session costs tens of KB.
SESSION_CAPACITY = 1000
# Uploads (and data: URL images stored as uploads) are deleted an hour after they arrive, checked every 10 minutes.
DELETE_CACHE = (600, 3600)

BLOCKS_OPTIONS = {"delete_cache": DELETE_CACHE}
# api_open=False: the REST routes (/gradio_api/run/...) can't run a queued event outside the queue and its
# concurrency limit (Gradio opens them by default outside Hugging Face Spaces).
QUEUE_OPTIONS = {"api_open": False}

# ---- messages -----------------------------------------------------------------------------------

BODY_TOO_LARGE = "This request is too large: at most {limit} are accepted here."
BODY_TOO_SLOW = f"The request arrived too slowly (under {MIN_BODY_RATE // 1024} KB/s); please try again."
TOO_MANY_FILES = "Too many files in one upload: at most {limit} are accepted."
NOT_JSON = "The request body must be a JSON object."
TOO_MANY_VALUES = f"The request has too many values (at most {MAX_JSON_VALUES:,}) or is nested too deeply."
TEXT_TOO_LONG = f"A text value in the request is longer than {MAX_TEXT_CHARS:,} characters."
BAD_FILE_OBJECT = "A file in the request must be an object with the path /gradio_api/upload returned."
NO_DATA = "The request needs a \"data\" list with the endpoint's inputs (see /gradio_api/info)."
UNKNOWN_EVENT = "There is no such endpoint; /gradio_api/info lists them."
BUSY = "The server is busy receiving other requests. Please try again in a moment."
BAD_REQUEST_SHAPE = "The request doesn't match this endpoint's inputs; /gradio_api/info describes them."


# ---- Gradio settings ------------------------------------------------------------------------------


def launch_options(blocks, max_files_per_upload: int = MAX_FILES_PER_UPLOAD) -> dict:
    """Keyword arguments for `blocks.launch()` that go with RequestLimits (besides max_file_size=MAX_FILE_BYTES).
    max_files_per_upload: the most files the page sends in one upload."""
    from starlette.middleware import Middleware

    return {
        "app_kwargs": {"middleware": [Middleware(RequestLimits, blocks=blocks, max_files_per_upload=max_files_per_upload)]},
        "state_session_capacity": SESSION_CAPACITY,
        # Everything through this process and its middleware: no Node front-end server, no static workers.
        "ssr_mode": False,
        "num_workers": 0,
        # No server-side routes the app doesn't use: run history's connects to Hugging Face buckets with
        # tokens and bucket names sent by the client (the server would make Hub calls for anyone), the MCP server.
        "run_history": False,
        "mcp_server": False,
    }


# ---- the middleware -------------------------------------------------------------------------------

_UPLOAD_ROUTE = re.compile(r"/gradio_api/upload/?$")
# Routes that run an event: by fn_index (queue/join, run/predict from the page) or by api_name.
_EVENT_ROUTE = re.compile(r"/gradio_api/(?:queue/join|call/v2/(?P<v2>[^/]+)|(?:call|run|api)/(?P<name>[^/]+))/?$")


class _Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RequestLimits:
    """ASGI middleware: every request's body bounded in size and pace, event payloads checked (see the module doc).

    Refusals are answered as JSON {"detail": sentence} with status 400, 404, 408, 413 or 503, and close the connection.
    """

    def __init__(self, app, blocks=None, upload_dir: str | os.PathLike | None = None,
                 max_files_per_upload: int = MAX_FILES_PER_UPLOAD):
        self.app, self.blocks, self._upload_dir = app, blocks, upload_dir
        self.max_files_per_upload = max_files_per_upload
        self._named_parameters: dict[str, list[str]] | None = None
        self.buffered = 0  # bytes of event bodies being read and checked now (MAX_BUFFERED_EVENT_BYTES)

    @property
    def upload_dir(self) -> Path:
        return Path(os.path.realpath(self._upload_dir)) if self._upload_dir is not None else upload_folder()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        event = _EVENT_ROUTE.search(path) if method == "POST" else None
        upload = method == "POST" and _UPLOAD_ROUTE.search(path) is not None
        limit = MAX_EVENT_BODY_BYTES if event else MAX_UPLOAD_BODY_BYTES if upload else MAX_OTHER_BODY_BYTES
        body = _Body(receive, limit)
        responder = _Responder(send, body)
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                raise _Refusal(413, BODY_TOO_LARGE.format(limit=_size(limit)))
            if event:
                payload = await self._read_event(body, limit if declared is None else declared, event)
                scope = _with_content_length(scope, len(payload))
                await self.app(scope, _replay(payload, receive), responder.send)
            elif upload:
                body.count_parts(_boundary(scope), self.max_files_per_upload)
                await self.app(scope, body.receive_for_upload, responder.send)
            else:
                await self.app(scope, body.receive, responder.send)
        except _Refusal as refusal:
            log.info("Refused %s %s (%d): %s", method, for_log(path, 100), refusal.status, refusal.message)
            await responder.refuse(refusal)

    # ---- event payloads ----

    async def _read_event(self, body: "_Body", size: int, route: re.Match) -> bytes:
        if self.buffered + size > MAX_BUFFERED_EVENT_BYTES:
            raise _Refusal(503, BUSY)
        self.buffered += size
        try:
            return await self._checked_event(await body.read_all(), route)
        finally:
            self.buffered -= size

    async def _checked_event(self, body: bytes, route: re.Match) -> bytes:
        if body.count(b",") + body.count(b"[") + body.count(b"{") > MAX_JSON_VALUES:
            raise _Refusal(413, TOO_MANY_VALUES)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise _Refusal(400, NOT_JSON) from None
        if not isinstance(payload, dict):
            raise _Refusal(400, NOT_JSON)
        inline_images = []
        self._check_values(payload, 0, inline_images)
        if route["v2"]:
            self._check_named_call(payload, route["v2"])
        else:
            fn = self._event_function(payload, route["name"])
            self._check_data(payload, fn)
        for file in inline_images:
            await self._store_inline_image(file)
        return json.dumps(payload).encode()

    def _check_values(self, value, depth: int, inline_images: list, key: str | None = None) -> None:
        """Strings short, nesting shallow, file objects naming uploads; data: URL images collected for storing."""
        if depth > MAX_JSON_DEPTH:
            raise _Refusal(413, TOO_MANY_VALUES)
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS and not (key == "url" and value.startswith("data:")):
                raise _Refusal(413, TEXT_TOO_LONG)
        elif isinstance(value, list):
            for item in value:
                self._check_values(item, depth + 1, inline_images)
        elif isinstance(value, dict):
            if _is_file_object(value):
                self._check_file_object(value, inline_images)
            for name, item in value.items():
                self._check_values(item, depth + 1, inline_images, key=name)

    def _check_file_object(self, file: dict, inline_images: list) -> None:
        path, url = file.get("path"), file.get("url")
        if path is None and isinstance(url, str) and url.startswith("data:"):
            if len(url) > MAX_DATA_URL_CHARS:
                raise _Refusal(413, DATA_URL_TOO_BIG)
            inline_images.append(file)
        elif path is None:
            if "meta" in file:  # Gradio would fail on it before the app's function could say why
                raise _Refusal(400, BAD_FILE_OBJECT)
        else:
            try:
                resolve_upload(path, self.upload_dir)
            except RequestError as exc:
                raise _Refusal(400, str(exc)) from None

    async def _store_inline_image(self, file: dict) -> None:
        """Turn a data: URL image into an uploaded file, so that Gradio keeps a path in its session state, not megabytes."""
        try:
            data = decode_data_url(file["url"])
        except RequestError as exc:
            raise _Refusal(400, str(exc)) from None
        path = await asyncio.to_thread(self._write_upload, data)
        file.clear()
        file.update({"path": path, "orig_name": "inline-image", "size": len(data), "meta": {"_type": "gradio.FileData"}})

    def _write_upload(self, data: bytes) -> str:
        folder = self.upload_dir / hashlib.sha256(data).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "inline-image"
        path.write_bytes(data)
        if self.blocks is not None:  # deleted with the other uploads (DELETE_CACHE)
            self.blocks.upload_file_set.add(str(path))
        return str(path)

    def _event_function(self, payload: dict, api_name: str | None):
        """The event a call runs, found as Gradio finds it; only documented endpoints may be called by name."""
        fns = getattr(self.blocks, "fns", None)
        if fns is None:
            return None
        fn_index = payload.get("fn_index")
        if fn_index is not None:
            if type(fn_index) is not int or fn_index not in fns:
                raise _Refusal(404, UNKNOWN_EVENT)
            return fns[fn_index]
        if api_name is None:  # queue/join without an fn_index
            raise _Refusal(400, UNKNOWN_EVENT)
        for fn in fns.values():
            if fn.api_name == api_name and fn.api_visibility == "public":
                return fn
        raise _Refusal(404, UNKNOWN_EVENT)

    def _check_data(self, payload: dict, fn) -> None:
        data = payload.get("data")
        if not isinstance(data, list):
            raise _Refusal(400, NO_DATA)
        if not isinstance(payload.get("session_hash", ""), (str, type(None))):
            raise _Refusal(400, BAD_REQUEST_SHAPE)
        if fn is None:
            return
        # Gradio fails a call with fewer values than inputs before the function runs: the missing ones are
        # None, which the app's functions read as "the default". Extra values would be ignored; they go.
        inputs = fn.inputs
        data[:] = (data + [None] * len(inputs))[: len(inputs)]
        for block, value in zip(inputs, data):
            self._check_input(block, value)
        for event_data_class in _event_data_parameters(fn):  # e.g. gr.SelectData: Gradio builds it before the function runs
            try:
                event_data_class(None, payload.get("event_data"))
            except Exception:
                raise _Refusal(400, BAD_REQUEST_SHAPE) from None

    def _check_named_call(self, payload: dict, api_name: str) -> None:
        """/call/v2/NAME takes the inputs by parameter name; Gradio fills the defaults."""
        parameters = self._parameters(api_name)
        if parameters is None:
            raise _Refusal(404, UNKNOWN_EVENT)
        names, blocks = zip(*parameters) if parameters else ((), ())
        unknown = set(payload) - set(names) - {"oauth_token"}
        if unknown:
            raise _Refusal(400, BAD_REQUEST_SHAPE)
        for name, block in parameters:
            self._check_input(block, payload.get(name))

    def _parameters(self, api_name: str) -> list[tuple[str, object]] | None:
        fn = next((fn for fn in getattr(self.blocks, "fns", {}).values()
                   if fn.api_name == api_name and fn.api_visibility == "public"), None)
        if fn is None:
            return None
        if self._named_parameters is None:
            self._named_parameters = {}
        if api_name not in self._named_parameters:
            info = self.blocks.get_api_info()["named_endpoints"].get("/" + api_name, {})
            self._named_parameters[api_name] = [p["parameter_name"] for p in info.get("parameters", [])]
        inputs = [block for block in fn.inputs if not getattr(block, "skip_api", False)]
        return list(zip(self._named_parameters[api_name], inputs))

    @staticmethod
    def _check_input(block, value) -> None:
        """A file input's value as Gradio will validate it before the function runs (gr.Image: ImageData)."""
        model = getattr(block, "data_model", None)
        if model is None or value is None:
            return
        try:
            model.model_validate(value, context={"validate_meta": True})
        except Exception:
            file_input = "File" in model.__name__ or "Image" in model.__name__
            raise _Refusal(400, NOT_A_FILE if file_input else BAD_REQUEST_SHAPE) from None


def _event_data_parameters(fn) -> list[type]:
    """The gr.EventData classes (gr.SelectData, ...) an event's function takes, which Gradio fills from the request."""
    import typing

    from gradio.events import EventData

    try:
        hints = typing.get_type_hints(fn.fn)
    except Exception:  # no function, or annotations that don't resolve: Gradio wouldn't fill them either
        return []
    return [hint for hint in hints.values() if isinstance(hint, type) and issubclass(hint, EventData)]


def _is_file_object(value: dict) -> bool:
    meta = value.get("meta")
    return "path" in value or (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData")


class _Body:
    """The request's receive(), bounded: at most `limit` bytes, at MIN_BODY_RATE after BODY_GRACE_S."""

    def __init__(self, receive, limit: int):
        self._receive, self.limit = receive, limit
        self.started, self.received, self.done = time.monotonic(), 0, False
        self.refusal: _Refusal | None = None
        self._delimiter: bytes | None = None
        self._tail, self._delimiters = b"", 0

    async def receive(self):
        """The next message; a refusal is raised, and kept in `refusal`: code that catches it (FastAPI turns
        errors reading a body into its own 400) still has its answer replaced by this one."""
        if self.done:
            return await self._receive()
        try:
            return self._counted(await self._next_message())
        except _Refusal as refusal:
            self.refusal = refusal
            raise

    async def _next_message(self):
        wait = self.started + BODY_GRACE_S + self.received / MIN_BODY_RATE - time.monotonic()
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._receive(), wait)
        except asyncio.TimeoutError:
            raise _Refusal(408, BODY_TOO_SLOW) from None

    def _counted(self, message):
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.limit:
                raise _Refusal(413, BODY_TOO_LARGE.format(limit=_size(self.limit)))
            if self._delimiter is not None:
                self._count_delimiters(chunk)
            self.done = not message.get("more_body", False)
        return message

    async def read_all(self) -> bytes:
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] != "http.request":  # the client went away
                raise _Refusal(400, "The request ended before its body arrived.")
            chunks.append(message.get("body", b""))
            if self.done:
                return b"".join(chunks)

    def count_parts(self, boundary: bytes | None, max_parts: int) -> None:
        """Count multipart delimiters as the body arrives (a file's data can't contain its own boundary): at most
        `max_parts` parts."""
        if boundary:
            self._delimiter, self._max_parts = b"--" + boundary, max_parts

    def _count_delimiters(self, chunk: bytes) -> None:
        window = self._tail + chunk
        self._delimiters += window.count(self._delimiter)
        self._tail = window[-(len(self._delimiter) - 1):]
        if self._delimiters > self._max_parts + 1:  # one delimiter before each part, one closing
            raise _Refusal(413, TOO_MANY_FILES.format(limit=self._max_parts))

    async def receive_for_upload(self):
        """As receive(), but a refusal is raised as the error Gradio's upload parser handles (it deletes its temporary files)."""
        from starlette.formparsers import MultiPartException

        try:
            return await self.receive()
        except _Refusal as refusal:
            raise MultiPartException(refusal.message) from None


class _Responder:
    """Passes the app's response on, or replaces it with the body's refusal (if the response hasn't started)."""

    def __init__(self, send, body: _Body):
        self._send, self.body, self.started, self.replaced = send, body, False, False

    async def send(self, message):
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            if self.body.refusal is not None:
                await self.refuse(self.body.refusal)
                return
            self.started = True
        await self._send(message)

    async def refuse(self, refusal: _Refusal) -> None:
        if self.started:
            return
        self.replaced = True
        body = json.dumps({"detail": refusal.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await self._send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise _Refusal(400, "The request's Content-Length is not a number.") from None
    return None


def _with_content_length(scope, length: int):
    headers = [(name, value) for name, value in scope.get("headers", []) if name != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(length).encode())]}


def _boundary(scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            match = re.search(rb'boundary="?([^";]+)"?', value)
            return match.group(1) if match else None
    return None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _size(limit: int) -> str:
    return f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 1024} KB"
