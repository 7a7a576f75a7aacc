"""Captioning a set of photos (the "Many photos" tab's library part): every file a caption or its error, in order."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from captioner import InvalidImageError
from webapp.many_photos import OUT_OF_TIME, caption_photos, clean_name, results_csv, results_json

GREEDY = {"method": "greedy"}


def refuse(message):
    def read():
        raise InvalidImageError(message)
    return read


def test_each_photo_gets_its_caption_or_its_error_in_order(tiny_captioner, example_images):
    photos = [(p.name, lambda p=p: p) for p in example_images[:10]]  # more than one encoder batch of 8
    photos.insert(3, ("notes.jpg", refuse("This file is not an image.")))
    seen = []
    results = caption_photos(tiny_captioner, photos, tiny_captioner.decoding_options(**GREEDY),
                             progress=lambda done, total: seen.append((done, total)))
    assert [r.image for r in results] == [name for name, _ in photos]
    assert results[3].error == "This file is not an image." and results[3].caption is None and not results[3].ok
    expected = tiny_captioner.caption_batch([p for p in example_images[:10]], **GREEDY)
    assert [r.caption for r in results if r.ok] == [c.text for c in expected]
    assert [r.log_prob for r in results if r.ok] == [round(c.candidates[0][1], 4) for c in expected]
    assert seen[-1] == (11, 11) and [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_files_not_read_before_the_deadline_say_so(tiny_captioner, example_images):
    results = caption_photos(tiny_captioner, [("a.jpg", lambda: example_images[0])] * 3, deadline=time.monotonic() - 1)
    assert [r.error for r in results] == [OUT_OF_TIME] * 3


def test_a_bad_setting_fails_the_whole_request_before_any_file_is_read(tiny_captioner):
    def never():
        raise AssertionError("read")
    with pytest.raises(ValueError, match="doesn't know the word 'zebra'"):
        caption_photos(tiny_captioner, [("a.jpg", never)], tiny_captioner.decoding_options(prefix="a zebra"))


@pytest.mark.parametrize(
    ("given", "shown"),
    [("holiday.jpg", "holiday.jpg"), ("../../etc/passwd", "passwd"), ("line\nbreak.jpg", "line?break.jpg"), ("", "(unnamed)"),
     (None, "(unnamed)"), ("x" * 300 + ".jpg", "x" * 197 + "...")],
)
def test_file_names_are_one_short_line(given, shown):
    assert clean_name(given) == shown


def test_csv_and_json(tiny_captioner, example_images):
    photos = [("=HYPERLINK(1).jpg", lambda: example_images[0]), ("b.jpg", refuse("Damaged, it says."))]
    results = caption_photos(tiny_captioner, photos, tiny_captioner.decoding_options(**GREEDY))
    rows = list(csv.DictReader(io.StringIO(results_csv(results))))
    assert [row["image"] for row in rows] == ["'=HYPERLINK(1).jpg", "b.jpg"]  # a spreadsheet shows it as text
    assert rows[0]["caption"] == results[0].caption and rows[1] == {"image": "b.jpg", "caption": "", "log_prob": "",
                                                                    "error": "Damaged, it says.", "objects": "",
                                                                    "familiar": ""}
    # objects and familiar: what the encoder's classifier sees (the tiny folder has no classifier: none, unknown)
    assert json.loads(results_json(results)) == [
        {"image": "=HYPERLINK(1).jpg", "caption": results[0].caption, "log_prob": results[0].log_prob, "error": None,
         "objects": [], "familiar": None},
        {"image": "b.jpg", "caption": None, "log_prob": None, "error": "Damaged, it says.", "objects": None, "familiar": None},
    ]
