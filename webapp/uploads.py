"""What a request sent: its image read from Gradio's upload cache, a data: URL or an example, and the text of
the errors it gets.

`RequestImages`, used by the page's handlers: a request's image -> prepared pixels. Only a regular file
inside Gradio's upload cache (symlinks followed) is read, or an example the server lists, chosen by
index; anything else gets one message that tells nothing about the server's files. The file is decoded
by a `captioner.sandbox.DecodePool` worker, never in the server.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from captioner.image import MAX_FILE_BYTES
from captioner.sandbox import DecodePool, DecoderBusyError

# ---- limits ---------------------------------------------------------------------------------------

# A data: URL image may be as large as an uploaded file, no larger (base64 adds a third).
MAX_DATA_URL_CHARS = 4 * math.ceil(MAX_FILE_BYTES / 3) + 256
# The longest string a request may carry (other than a data: URL image), a file path included. The app's
# settings are a few short strings and numbers; a caption's start (prefix) is at most a few dozen words.
MAX_TEXT_CHARS = 4096
# What goes into the log of a request's value, and what an error message shown to a user may be.
MAX_LOGGED_CHARS = 200
MAX_MESSAGE_CHARS = 400

# ---- messages -----------------------------------------------------------------------------------

NO_IMAGE = "Please upload an image first (or pick one of the examples)."
NOT_UPLOADED = (
    "This request names a file that wasn't uploaded to this app. Upload the image first "
    "(POST /gradio_api/upload, or handle_file() in gradio_client) and send the path it returns."
)
NOT_A_FILE = "The image must be an uploaded file: a file object with the path /gradio_api/upload returned, or a data: URL."
BAD_DATA_URL = "The image data sent is not a valid base64 data: URL."
DATA_URL_TOO_BIG = f"The image sent as a data: URL is larger than {MAX_FILE_BYTES // 2**20} MB."
FILE_TOO_BIG = f"The file is larger than {MAX_FILE_BYTES // 2**20} MB."
NOT_AN_EXAMPLE = "Please pick one of the examples shown on the page."


class RequestError(ValueError):
    """A request the app can't serve; the message is for the user."""


# ---- text for logs and users --------------------------------------------------------------------


def for_log(value, limit: int = MAX_LOGGED_CHARS) -> str:
    """A request's value (or an error about one) for the log: one line, control characters escaped, truncated."""
    text = value if isinstance(value, str) else str(value)
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text):,} characters)"


def user_message(error: BaseException | str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error's message as shown to a user: one line of printable characters, at most `limit` of them."""
    text = "".join(c for c in " ".join(str(error).split()) if c.isprintable())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- a request's image --------------------------------------------------------------------------


def upload_folder() -> Path:
    """Gradio's upload cache ($GRADIO_TEMP_DIR, else <tmp>/gradio), symlinks resolved."""
    from gradio.utils import get_upload_folder

    return Path(os.path.realpath(get_upload_folder()))


def uploaded_file_bytes(payload, upload_dir: str | os.PathLike | None = None) -> bytes:
    """The image a request sent -> its bytes, read only from Gradio's upload cache (or a data: URL).

    `payload` is what Gradio passes with preprocess=False: a file object {"path": ..., ...}, a path
    string, a data: URL, or None. Raises RequestError with a sentence otherwise.
    """
    if payload is None or payload == "":
        raise RequestError(NO_IMAGE)
    if isinstance(payload, str):
        path, url = (None, payload) if payload.startswith("data:") else (payload, None)
    elif isinstance(payload, dict):
        path, url = payload.get("path"), payload.get("url")
    else:
        raise RequestError(NOT_A_FILE)
    if path is None and isinstance(url, str) and url.startswith("data:"):
        return decode_data_url(url)
    if path is None and url is None:
        raise RequestError(NO_IMAGE)
    return read_upload(path, upload_dir)


def resolve_upload(path, upload_dir: str | os.PathLike | None = None) -> str:
    """`path` -> its real path, if that is a regular file inside the upload cache; else RequestError(NOT_UPLOADED).

    Every failure gets the same message (missing, a directory, a device, a symlink out of the cache,
    a URL, not a string), so that answers tell nothing about what exists on the server.
    """
    if not isinstance(path, str) or not path or "\0" in path or len(path) > MAX_TEXT_CHARS:
        raise RequestError(NOT_UPLOADED)
    folder = Path(os.path.realpath(upload_dir)) if upload_dir is not None else upload_folder()
    real = os.path.realpath(path)
    try:
        inside = Path(real).relative_to(folder) != Path(".")
        regular = stat.S_ISREG(os.stat(real).st_mode)
    except (ValueError, OSError):
        inside = regular = False
    if not (inside and regular):
        raise RequestError(NOT_UPLOADED)
    return real


def read_upload(path, upload_dir: str | os.PathLike | None = None) -> bytes:
    """The bytes of an uploaded file (see resolve_upload), at most MAX_FILE_BYTES."""
    real = resolve_upload(path, upload_dir)
    try:
        # O_NOFOLLOW and O_NONBLOCK: nothing swapped in since resolving can make this follow a link or block
        # (a FIFO); fstat checks what was really opened.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise RequestError(NOT_UPLOADED) from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RequestError(NOT_UPLOADED)
        if info.st_size > MAX_FILE_BYTES:
            raise RequestError(FILE_TOO_BIG)
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise RequestError(FILE_TOO_BIG)
    return data


def decode_data_url(url: str) -> bytes:
    """A base64 data: URL -> its bytes, at most MAX_FILE_BYTES."""
    if len(url) > MAX_DATA_URL_CHARS:
        raise RequestError(DATA_URL_TOO_BIG)
    header, comma, encoded = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(BAD_DATA_URL)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(BAD_DATA_URL) from None
    if len(data) > MAX_FILE_BYTES:
        raise RequestError(DATA_URL_TOO_BIG)
    return data


def example_index(index, count: int) -> int:
    """An example gallery click's index, checked: a whole number that picks one of the `count` examples."""
    if type(index) is not int or not 0 <= index < count:
        raise RequestError(NOT_AN_EXAMPLE)
    return index


class RequestImages:
    """A request's image -> the encoder's pixels: the checks above, then a decode worker (sandbox.py).

        images = RequestImages(captioner.encoder.input_size, examples)   # starts a DecodePool
        pixels = images.upload(payload)      # (h, w, 3) uint8, or RequestError / InvalidImageError
        pixels = images.example(index)       # a gallery click: the server's own file images.examples[index]
        pixels, display = images.upload(payload, display_max_side=768)   # and the photo to show, aspect kept
    """

    def __init__(self, input_size: tuple[int, int], examples: Sequence[str | os.PathLike] = (),
                 pool: DecodePool | None = None, upload_dir: str | os.PathLike | None = None):
        self.input_size = tuple(input_size)
        self.examples = [str(path) for path in examples]
        self.pool = pool or DecodePool().wait_ready()  # started now, so that the first request doesn't wait
        self.upload_dir = upload_dir

    def upload(self, payload, display_max_side: int = 0):
        """-> pixels; with display_max_side, (pixels, display) from the same decode (DecodePool.prepare_pixels_and_display)."""
        return self._pixels(uploaded_file_bytes(payload, self.upload_dir), display_max_side)

    def example(self, index, display_max_side: int = 0):
        return self._pixels(Path(self.examples[example_index(index, len(self.examples))]).read_bytes(), display_max_side)

    def _pixels(self, data: bytes, display_max_side: int):
        try:
            if display_max_side:
                return self.pool.prepare_pixels_and_display(data, self.input_size, display_max_side)
            return self.pool.prepare_pixels(data, self.input_size)
        except DecoderBusyError as busy:
            raise RequestError(str(busy)) from None
