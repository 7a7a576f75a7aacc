"""`RequestLimits`, an ASGI middleware in front of Gradio: what reaches Gradio at all.

Everything a request carries is hostile until checked: its size, its pace, its shape, every path and
string in it. Some of Gradio's own work happens before the app's function runs (it copies or downloads
the files a payload names, validates file objects, keeps each session's inputs in memory), so the limits
must apply before it: a body size per route, a minimum upload rate, a bound on files per upload, and for
event calls a parsed, checked payload (short strings; files only from the upload cache; data: URLs turned
into uploaded files; a short argument list filled with None; every refusal a sentence).

Every route Gradio mounts is listed in ROUTES with what this app lets through it; any other request is
refused (404), so a Gradio upgrade that adds a route adds nothing until it is listed (a test compares the
list with what Gradio mounts). No route fetches a URL: file= routes refuse one, the proxy route is refused,
and a payload naming a URL is refused wherever it arrives (queue/join, call, run, stream).

Sharing between clients is `traffic.py`'s (event bodies in memory, the queue's bounds and fair lines), the
upload cache's bound and sweeping `upload_cache.py`'s.

`launch_options()`, `BLOCKS_OPTIONS` and `QUEUE_OPTIONS` are the Gradio settings that go with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .traffic import BodyBudget, QueueLimits, Refused, client_address
from .upload_cache import CacheFull, UploadCache
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
# Gradio's own cleanup of the uploads it listed (every 10 minutes, an hour old) and of the cache when the app
# stops; upload_cache.UploadCache deletes the rest (failed uploads' parts, outputs) and bounds the total.
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
BAD_REQUEST_SHAPE = "The request doesn't match this endpoint's inputs; /gradio_api/info describes them."
NOT_A_ROUTE = "There is no such page or endpoint here."
NO_URLS = "This app serves only its own files: it fetches no URL."
AMBIGUOUS_UPLOAD = "The upload's Content-Type must name its multipart boundary exactly once, plainly."


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


# ---- the routes -----------------------------------------------------------------------------------

# What each route Gradio mounts may be used for, by (method, Gradio's path template):
PAGE = "page"  # a read-only GET (the page, its assets, API info, event streams): passed on, no body
EVENT = "event"  # runs an event: the payload parsed and checked, the queue's bounds applied
UPLOAD = "upload"  # multipart files: counted parts, the upload cache's bound
FILE = "file"  # a file from Gradio's cache or the allowed paths, never a URL
SMALL = "small"  # small JSON the page posts (cancel, reset, a stream's close, component server calls)
REFUSED = "refused"  # what this app doesn't use: answered 404 before Gradio sees it

_API = "/gradio_api"
ROUTES: dict[tuple[str, str], str] = {
    **{("GET", path): PAGE for path in [
        "/", "/config", "/config/", "/openapi.json", "/static/{path:path}", "/assets/{path:path}", "/svelte/{path:path}",
        "/favicon.ico", "/theme.css", "/robots.txt", "/pwa_icon", "/pwa_icon/{size}", "/manifest.json",
        *(_API + path for path in [
            "/user", "/user/", "/login_check", "/login_check/", "/app_id", "/app_id/", "/info", "/info/", "/openapi.json",
            "/heartbeat/{session_hash}", "/call/{api_name}/{event_id}", "/call/v2/{api_name}/{event_id}", "/queue/data",
            "/queue/status", "/upload_progress", "/startup-events", "/theme.css"])]},
    ("HEAD", "/"): PAGE,
    ("HEAD", "/openapi.json"): PAGE,
    ("GET", _API + "/file={path_or_url:path}"): FILE,
    ("HEAD", _API + "/file={path_or_url:path}"): FILE,
    ("GET", _API + "/file/{path:path}"): FILE,
    **{("POST", _API + path): EVENT for path in [
        "/queue/join", "/call/{api_name}", "/call/{api_name}/", "/call/v2/{api_name}", "/call/v2/{api_name}/",
        "/run/{api_name}", "/run/{api_name}/", "/api/{api_name}", "/api/{api_name}/", "/stream/{event_id}"]},
    ("POST", _API + "/upload"): UPLOAD,
    **{("POST", _API + path): SMALL for path in [
        "/cancel", "/reset", "/reset/", "/component_server", "/component_server/", "/stream/{event_id}/close"]},
    # No login here (login, logout, the OAuth token), no monitoring dashboard or dev reload, no run history,
    # no custom components, no media streams, no recording, no AI editing; and the proxy route fetches URLs.
    **{(method, path): REFUSED for method, path in [
        ("POST", "/login"), ("POST", "/login/"), ("GET", "/logout"), ("GET", "/monitoring"), ("GET", "/monitoring/summary"),
        ("GET", "/monitoring/{key}"), *((method, _API + path) for method, path in [
            ("GET", "/token"), ("GET", "/token/"), ("GET", "/deep_link"), ("GET", "/dev/reload"), ("GET", "/runs"),
            ("GET", "/runs/"), ("GET", "/custom_component/{id}/{environment}/{type}/{file_name}"),
            ("GET", "/proxy={url_path:path}"), ("HEAD", "/proxy={url_path:path}"),
            ("GET", "/stream/{session_hash}/{run}/{component_id}/playlist.m3u8"),
            ("GET", "/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}"),
            ("GET", "/stream/{session_hash}/{run}/{component_id}/playlist-file"), ("POST", "/process_recording"),
            ("POST", "/vibe-edit"), ("POST", "/vibe-edit/"), ("POST", "/undo-vibe-edit"), ("POST", "/undo-vibe-edit/"),
            ("GET", "/vibe-code"), ("GET", "/vibe-code/"), ("POST", "/vibe-code"), ("POST", "/vibe-code/"),
            ("POST", "/vibe-starter-queries"), ("POST", "/vibe-starter-queries/")])]},
}
# A path with a URL scheme ("http:", "HTTPS:", "//host"): what Gradio's file= route would fetch.
_URL_LIKE = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:|[/\\]{2})")


@dataclass(frozen=True)
class Route:
    policy: str
    template: str
    params: dict


def _compiled_routes() -> list[tuple[str, re.Pattern, str, str]]:
    """ROUTES as the router matches them: Starlette's own compile_path, so a path means here what it means there."""
    from starlette.routing import compile_path

    return [(method, compile_path(template)[0], template, policy) for (method, template), policy in ROUTES.items()]


def find_route(method: str, path: str, compiled=None) -> Route | None:
    for route_method, regex, template, policy in compiled or _compiled_routes():
        if route_method == method:
            match = regex.match(path)
            if match:
                return Route(policy, template, match.groupdict())
    return None


class _Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class RequestLimits:
    """ASGI middleware: every request's route, body size and pace checked, event payloads checked (see the module doc).

    Refusals are answered as JSON {"detail": sentence} with status 400, 404, 408, 413, 429 or 503, and close the
    connection.
    """

    def __init__(self, app, blocks=None, upload_dir: str | os.PathLike | None = None,
                 max_files_per_upload: int = MAX_FILES_PER_UPLOAD):
        self.app, self.blocks, self._upload_dir = app, blocks, upload_dir
        self.max_files_per_upload = max_files_per_upload
        self._named_parameters: dict[str, list[str]] | None = None
        self._routes = _compiled_routes()
        self.bodies = BodyBudget()
        self.queue_limits = QueueLimits(blocks)
        # The files Gradio copied into the cache while building the page (the example photos): the app's own.
        own_files = frozenset(path for files in getattr(blocks, "temp_file_sets", ()) for path in files)
        self.cache = UploadCache(lambda: self.upload_dir, keep=own_files)
        if blocks is not None:  # the running app: its cache swept from now on
            self.cache.start()

    @property
    def upload_dir(self) -> Path:
        return Path(os.path.realpath(self._upload_dir)) if self._upload_dir is not None else upload_folder()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        route = find_route(method, path.removeprefix(scope.get("root_path", "") or ""), self._routes)
        policy = route.policy if route else REFUSED
        limit = MAX_EVENT_BODY_BYTES if policy == EVENT else MAX_UPLOAD_BODY_BYTES if policy == UPLOAD else MAX_OTHER_BODY_BYTES
        client = client_address(scope)
        body = _Body(receive, limit)
        responder = _Responder(send, body)
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                raise _Refusal(413, BODY_TOO_LARGE.format(limit=_size(limit)))
            if policy == REFUSED:
                raise _Refusal(404, NOT_A_ROUTE)
            if policy == EVENT:
                payload = await self._read_event(body, route, client)
                scope = _with_content_length(scope, len(payload))
                await self.app(scope, _replay(payload, receive), responder.send)
            elif policy == UPLOAD:
                await self._upload(scope, body, responder, client)
            else:
                if policy == FILE and _URL_LIKE.match(next(iter(route.params.values()), "")):
                    raise _Refusal(404, NO_URLS)
                await self.app(scope, body.receive, responder.send)
        except _Refusal as refusal:
            log.info("Refused %s %s (%d): %s", method, for_log(path, 100), refusal.status, refusal.message)
            await responder.refuse(refusal)

    # ---- uploads ----

    async def _upload(self, scope, body: _Body, responder: _Responder, client: str) -> None:
        body.count_parts(_boundary(scope), self.max_files_per_upload)
        body.on_bytes = lambda count: self._charge_cache(client, count)
        try:
            await self.app(scope, body.receive_for_upload, responder.send)
        finally:
            if responder.status != 200:  # Gradio may have left the parts it wrote: the cache sweeps them soon
                self.cache.upload_failed()

    def _charge_cache(self, client: str, count: int) -> None:
        try:
            self.cache.charge(client, count)
        except CacheFull as full:
            raise _Refusal(full.status, str(full)) from None

    # ---- event payloads ----

    async def _read_event(self, body: _Body, route: Route, client: str) -> bytes:
        try:
            held = self.bodies.open(client)
        except Refused as refused:
            raise _Refusal(refused.status, refused.message) from None

        def count(size: int) -> None:
            try:
                held.add(size)
            except Refused as refused:
                raise _Refusal(refused.status, refused.message) from None

        body.on_bytes = count
        try:
            data = await body.read_all()
        finally:
            held.close()  # parsed below: a copy or two of it, for a moment, not while the client takes its time
        return await self._checked_event(data, route, client)

    async def _checked_event(self, body: bytes, route: Route, client: str = "unknown") -> bytes:
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
        if "/call/v2/" in route.template:
            fn = self._check_named_call(payload, route.params["api_name"])
        else:
            fn = self._event_function(payload, route)
            self._check_data(payload, fn)
        if fn is not None and "/stream/" not in route.template:  # a stream's data goes to an event already queued
            try:
                session = payload.get("session_hash")
                self.queue_limits.admit(fn, client, session if isinstance(session, str) else None)
            except Refused as refused:
                raise _Refusal(refused.status, refused.message) from None
        for file in inline_images:
            await self._store_inline_image(file, client)
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
            if isinstance(url, str):  # a URL to fetch: never
                raise _Refusal(400, NOT_A_FILE)
            if "meta" in file:  # Gradio would fail on it before the app's function could say why
                raise _Refusal(400, BAD_FILE_OBJECT)
        else:
            try:
                resolve_upload(path, self.upload_dir)
            except RequestError as exc:
                raise _Refusal(400, str(exc)) from None

    async def _store_inline_image(self, file: dict, client: str) -> None:
        """Turn a data: URL image into an uploaded file, so that Gradio keeps a path in its session state, not megabytes."""
        try:
            data = decode_data_url(file["url"])
        except RequestError as exc:
            raise _Refusal(400, str(exc)) from None
        self._charge_cache(client, len(data))
        path = await asyncio.to_thread(self._write_upload, data)
        file.clear()
        file.update({"path": path, "orig_name": "inline-image", "size": len(data), "meta": {"_type": "gradio.FileData"}})

    def _write_upload(self, data: bytes) -> str:
        # A random folder: a name derived from the bytes would tell anyone holding an image whether it was sent.
        folder = self.upload_dir / secrets.token_hex(16)
        folder.mkdir(parents=True)
        path = folder / "inline-image"
        path.write_bytes(data)
        if self.blocks is not None:  # deleted with the other uploads (DELETE_CACHE)
            self.blocks.upload_file_set.add(str(path))
        return str(path)

    def _event_function(self, payload: dict, route: Route):
        """The event a call runs, found as Gradio finds it; only documented endpoints may be called by name, and
        new data streamed only to a queued streaming event (this app has none)."""
        fns = getattr(self.blocks, "fns", None)
        if fns is None:
            return None
        if "event_id" in route.params:
            event = self.blocks._queue.event_ids_to_events.get(route.params["event_id"])
            if event is None or not getattr(event, "streaming", False):
                raise _Refusal(404, UNKNOWN_EVENT)
            return event.fn
        api_name = route.params.get("api_name")
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

    def _check_named_call(self, payload: dict, api_name: str):
        """/call/v2/NAME takes the inputs by parameter name; Gradio fills the defaults. -> the event's function."""
        fn = next((fn for fn in getattr(self.blocks, "fns", {}).values()
                   if fn.api_name == api_name and fn.api_visibility == "public"), None)
        if fn is None:
            raise _Refusal(404, UNKNOWN_EVENT)
        parameters = self._parameters(fn, api_name)
        names = [name for name, _ in parameters]
        unknown = set(payload) - set(names) - {"oauth_token"}
        if unknown:
            raise _Refusal(400, BAD_REQUEST_SHAPE)
        for name, block in parameters:
            self._check_input(block, payload.get(name))
        return fn

    def _parameters(self, fn, api_name: str) -> list[tuple[str, object]]:
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
        self.on_bytes = None  # called with each chunk's size as it arrives; may raise a _Refusal
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
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
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

    def count_parts(self, boundary: bytes, max_parts: int) -> None:
        """Count multipart delimiters as the body arrives (a file's data can't contain its own boundary): at most
        `max_parts` parts."""
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
        self.status: int | None = None  # the status answered

    async def send(self, message):
        if self.replaced:
            return
        if message["type"] == "http.response.start":
            if self.body.refusal is not None:
                await self.refuse(self.body.refusal)
                return
            self.started, self.status = True, message["status"]
        await self._send(message)

    async def refuse(self, refusal: _Refusal) -> None:
        if self.started:
            return
        self.replaced, self.status = True, refusal.status
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


def _boundary(scope) -> bytes:
    """An upload's multipart boundary, read as Gradio's parser reads it (python_multipart's parse_options_header),
    from a Content-Type that names exactly one, plainly: parsers that disagree on a header (a parameter twice,
    BOUNDARY in capitals, escaped quotes) could otherwise count other parts than the ones stored."""
    from python_multipart.multipart import parse_options_header

    values = [value for name, value in scope.get("headers", []) if name == b"content-type"]
    if len(values) != 1:
        raise _Refusal(400, AMBIGUOUS_UPLOAD)
    _, options = parse_options_header(values[0])
    boundary = options.get(b"boundary")
    if (not boundary or len(re.findall(rb"boundary\s*=", values[0], re.IGNORECASE)) != 1
            or not re.fullmatch(rb"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary)):  # RFC 2046's characters, no quotes or spaces
        raise _Refusal(400, AMBIGUOUS_UPLOAD)
    return boundary


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
