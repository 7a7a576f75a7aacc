"""Captioning a set of photos at once, as the app's "Many photos" tab does: every file gets a caption or
its error, and the results can be written as CSV and JSON.

    photos = [("holiday.jpg", lambda: pixels_of(upload)), ...]   # name, and how to read it
    results = caption_photos(captioner, photos, options, progress=lambda done, total: ...)
    write_csv(results, "captions.csv"); write_json(results, "captions.json")

A file that can't be read is recorded with the sentence that says why (InvalidImageError, or any
ValueError a reader raises for the user) and never stops the others. The readable ones are captioned
in encoder batches.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from captioner import Captioner, DecodingOptions

BATCH_SIZE = 8  # images per encoder call, as ImageEncoder's own batches
MAX_NAME_CHARS = 200  # a file name as shown and written: names come from the uploader
# The names `captioner --json` and captioner.batch use; objects: "name probability; ..." in the CSV, a list in the JSON.
CSV_COLUMNS = ("image", "caption", "log_prob", "error", "objects", "familiar")
OUT_OF_TIME = "Not captioned: the request ran out of time before this file was read. Please send it again."
# A spreadsheet runs a cell that starts with one of these as a formula ("=HYPERLINK(...)"), after any spaces
# (" =1+1"), or with a tab or carriage return: file names are the uploader's, so such a name is written with
# a leading apostrophe, which spreadsheets show as text.
FORMULA_STARTS = ("=", "+", "-", "@")


@dataclass(frozen=True)
class PhotoResult:
    image: str  # the file's name as given (cleaned: one line, at most MAX_NAME_CHARS)
    caption: str | None = None
    log_prob: float | None = None  # the caption's total log-probability
    error: str | None = None  # why the file has no caption, for the user
    objects: list[tuple[str, float]] | None = None  # what the encoder's ImageNet classifier sees (Caption.objects)
    familiar: bool | None = None  # whether the photo is like the training photos (None: the weights can't tell)

    @property
    def ok(self) -> bool:
        return self.error is None


def caption_photos(
    captioner: Captioner,
    photos: Iterable[tuple[str, Callable[[], object]]],
    options: DecodingOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    deadline: float | None = None,
) -> list[PhotoResult]:
    """(name, read) pairs -> one PhotoResult per photo, in order. read() returns an image `Captioner.caption`
    takes (pixels, a path, bytes, ...) or raises ValueError with a sentence. progress(done, total) is called
    as files are read and batches captioned. Files not yet read at `deadline` (time.monotonic()) are not read:
    their error says so."""
    options = captioner.decoding_options(options)  # a bad setting fails the whole request, before any work
    photos = [(clean_name(name), read) for name, read in photos]
    total, done = len(photos), 0
    results: list[PhotoResult | None] = [None] * total
    pending: list[tuple[int, object]] = []  # (position, image) read but not yet captioned

    def caption_pending() -> None:
        nonlocal done
        captions = captioner.caption_batch([image for _, image in pending], options)
        for (position, _), caption in zip(pending, captions):
            results[position] = PhotoResult(photos[position][0], caption.text, round(caption.candidates[0][1], 4),
                                            objects=caption.objects, familiar=caption.familiar)
        done += len(pending)
        pending.clear()
        if progress:
            progress(done, total)

    for position, (name, read) in enumerate(photos):
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise ValueError(OUT_OF_TIME)
            pending.append((position, read()))
        except ValueError as exc:  # InvalidImageError, or the reader's own refusal
            results[position] = PhotoResult(name, error=str(exc))
            done += 1
            if progress:
                progress(done, total)
        if len(pending) == BATCH_SIZE:
            caption_pending()
    if pending:
        caption_pending()
    return results  # type: ignore[return-value]


def read_once(read: Callable[[object], object]) -> Callable[[object], object]:
    """`read(upload)` for one request, each file read once: a batch naming one file 50 times decodes it once
    (its result, or its error, is given again). Files are told apart by their real path (a data: URL by itself)."""
    done: dict[str, tuple[bool, object]] = {}

    def once(upload):
        key = _file_key(upload)
        if key not in done:
            try:
                done[key] = (True, read(upload))
            except ValueError as exc:  # the reader's sentence for this file, given to every copy of it
                done[key] = (False, exc)
        ok, value = done[key]
        if not ok:
            raise value
        return value

    return once


def _file_key(upload) -> str:
    path = upload.get("path") if isinstance(upload, dict) else upload
    if isinstance(path, str) and not path.startswith("data:"):
        return "path:" + os.path.realpath(path)
    url = upload.get("url") if isinstance(upload, dict) else None
    return "other:" + repr(url if isinstance(url, str) else upload)


def clean_name(name) -> str:
    """An uploader's file name as shown and written: its last path part, one printable line, bounded."""
    text = Path(str(name or "")).name or "(unnamed)"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_NAME_CHARS else text[: MAX_NAME_CHARS - 3] + "..."


def results_csv(results: Iterable[PhotoResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for result in results:
        row = asdict(result)
        row["objects"] = "; ".join(f"{name} {p}" for name, p in result.objects or [])
        row["familiar"] = "" if result.familiar is None else str(result.familiar).lower()
        writer.writerow([_spreadsheet_safe(row[column]) for column in CSV_COLUMNS])
    return buffer.getvalue()


def results_json(results: Iterable[PhotoResult]) -> str:
    return json.dumps([asdict(result) for result in results], indent=1, ensure_ascii=False) + "\n"


def write_csv(results: Iterable[PhotoResult], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(results_csv(results), encoding="utf-8", newline="")
    return path


def write_json(results: Iterable[PhotoResult], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(results_json(results), encoding="utf-8")
    return path


def _spreadsheet_safe(value):
    if isinstance(value, str) and (value.lstrip().startswith(FORMULA_STARTS) or value.startswith(("\t", "\r"))):
        return "'" + value
    return "" if value is None else value

