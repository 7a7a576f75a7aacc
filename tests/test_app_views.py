"""The page's views on a real server: /explain (each word's probability and heatmap), captions that start with
given words, the candidates' ranking score, and /caption_many (many photos, their CSV and JSON); and the new
endpoints against the hostile requests and files /caption is tested with (tests/test_security.py, hostile_files.py).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from benchmarks.app_process import app_process
from captioner.image import MAX_FILE_BYTES
from tests.hostile_files import CAPTION, hostile_files
from tests.test_security import ANSWER_S, FILE_META, HOSTILE_VALUES, SECRET, SENTENCE, assert_refused, call, upload
from webapp import handlers, uploads

SETTINGS = ("greedy", 5, None, None)  # method, beam width, max length, length penalty


@pytest.fixture(scope="module")
def served(tiny_weights):
    with app_process(tiny_weights) as process:
        yield process


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served.url, verbose=False)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url + "/gradio_api", timeout=120) as client:
        yield client


def explain(client, image, *settings, **named):
    caption, words, heatmap, note, table, facts, seen, seen_data = client.predict(handle_file(image), *settings, api_name="/explain", **named)
    return {"caption": caption, "words": words, "heatmap": Image.open(heatmap), "note": note, "table": table, "facts": facts,
            "seen": seen, "seen_data": seen_data}


# ---- /explain -------------------------------------------------------------------------------------


def test_explain_gives_the_caption_word_by_word_with_a_heatmap(client, tiny_captioner, example_images):
    photo = example_images[1]
    shown = explain(client, photo, "beam", 3, None, 0.0)
    text, table, *_ = client.predict(handle_file(photo), "beam", 3, None, 0.0, api_name="/caption")
    assert shown["caption"] == text and shown["table"]["data"] == table["data"]  # the same caption and candidates
    assert [w["token"] for w in shown["words"]] == text.split()

    # The words' probabilities and the heatmap are the library's for the same file, drawn on the photo as it is:
    # its own shape (451x300), not the encoder's square.
    explanation = tiny_captioner.explain(photo, method="beam", beam_width=3, length_penalty=0.0)
    assert [w["class_or_confidence"] for w in shown["words"]] == [round(w.probability, 3) for w in explanation.words]
    index = explanation.first_content_word
    assert f"\u201c{explanation.words[index].word}\u201d** (word {index + 1}," in shown["note"]
    assert shown["heatmap"].size == explanation.image.size == Image.open(photo).size != (224, 224)
    expected = np.asarray(explanation.overlay(index), float)
    received = np.asarray(shown["heatmap"].convert("RGB"), float)
    assert np.abs(received - expected).mean() < 4  # JPEG on the way
    assert "this caption took" in shown["facts"]


def test_explain_draws_the_word_asked_for(client, example_images):
    first = explain(client, example_images[0], *SETTINGS, word=0)
    last_index = len(first["words"]) - 1
    last = explain(client, example_images[0], *SETTINGS, word=last_index)
    assert "(word 1," in first["note"] and f"(word {last_index + 1}," in last["note"]
    for word, message in [(last_index + 1, "The word to show must be a whole number from 0 to"), (-1, "from 0 to"), (1.5, "from 0 to"),
                          ("dog", "The word to show must be its position")]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(example_images[0]), *SETTINGS, word=word, api_name="/explain")


# ---- captions that start with given words ------------------------------------------------------------


@pytest.mark.parametrize("api", ["/caption", "/explain"])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_caption_starts_with_the_prompt(client, example_images, api, method):
    caption = client.predict(handle_file(example_images[2]), method, 3, None, None, "A dog!", api_name=api)[0]
    assert caption.startswith("a dog ")
    with pytest.raises(AppError, match="doesn't know the words 'zebra', 'moon'"):
        client.predict(handle_file(example_images[2]), method, 3, None, None, "a zebra on the moon", api_name=api)


# ---- the candidates table --------------------------------------------------------------------------

READABLE = re.compile(r"\d+(\.\d)?%|1 in [\d,.]+( million| billion| trillion)?|under 1 in a quadrillion")


def test_candidates_are_ranked_by_the_length_penalised_score(client, tiny_captioner, example_images):
    _, table, *_ = client.predict(handle_file(example_images[3]), "beam", 5, None, 2.0, api_name="/caption")
    assert table["headers"] == app.CANDIDATE_HEADERS == ["#", "caption", "score", "log-prob", "probability"]
    rows = table["data"]
    assert len(rows) > 1 and [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    for _, text, score, log_prob, probability in rows:
        words = len(text.split())  # tokens: the words and <end>, or just the words if it ran out of room
        assert any(score == pytest.approx(log_prob / ((5 + length) / 6) ** 2, abs=0.011) for length in (words, words + 1))
        assert READABLE.fullmatch(probability), probability
    # Without the penalty the score is the log-probability.
    _, table, *_ = client.predict(handle_file(example_images[3]), "beam", 5, None, 0.0, api_name="/caption")
    assert all(row[2] == row[3] for row in table["data"])


# ---- /caption_many ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory, example_images) -> list[Path]:
    folder = tmp_path_factory.mktemp("mixed")
    notes, cut = folder / "notes.jpg", folder / "=cut-off.jpg"  # a name a spreadsheet would run as a formula
    notes.write_text("not a photo")
    cut.write_bytes(example_images[0].read_bytes()[:2000])
    return [example_images[0], notes, example_images[1], cut, example_images[2]]


def test_many_photos_each_get_a_caption_or_their_error(client, mixed_files):
    gallery, summary, table, downloads = client.predict([handle_file(f) for f in mixed_files], *SETTINGS, api_name="/caption_many")
    assert table["headers"] == app.BATCH_HEADERS
    rows = table["data"]
    assert [row[0] for row in rows] == [f.name for f in mixed_files]  # every file, in the order sent
    singles = {f: client.predict(handle_file(f), *SETTINGS, api_name="/caption")[0] for f in mixed_files[::2]}
    for (name, caption, error, seen), path in zip(rows, mixed_files):
        if path in singles:
            assert caption == singles[path] and error == ""  # the same caption as one photo at a time
        else:
            assert caption == "" and SENTENCE.fullmatch(error)
    assert "not an image" in rows[1][2] and "damaged" in rows[3][2]
    assert [item["caption"] for item in gallery] == [f"{path.name}: {singles[path]}" for path in singles]
    # Each photo is shown in its own shape, shrunk to at most GALLERY_MAX_SIDE a side.
    for item, path in zip(gallery, singles):
        width, height = Image.open(path).size
        scale = min(1.0, handlers.GALLERY_MAX_SIDE / max(width, height))
        assert Image.open(item["image"]).size == (round(width * scale), round(height * scale))
    assert "**3 of 5** photos" in summary and "2 files have no caption" in summary

    csv_file, json_file = sorted(downloads, key=lambda p: Path(p).suffix)
    written = json.loads(Path(json_file).read_text())
    assert [(r["image"], r["caption"], r["error"]) for r in written] == [(n, c or None, e or None) for n, c, e, _ in rows]
    assert all((r["log_prob"] is None) == (r["caption"] is None) for r in written)
    lines = list(csv.DictReader(io.StringIO(Path(csv_file).read_text())))
    assert [line["caption"] for line in lines] == [c for _, c, _, _ in rows]
    assert lines[3]["image"] == "'=cut-off.jpg"  # shown as text, not run


def test_many_photos_refuses_too_many_or_none(client, tmp_path, example_images):
    with pytest.raises(AppError, match="Please choose some photos"):
        client.predict([], *SETTINGS, api_name="/caption_many")
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), "red").save(small)
    with pytest.raises(AppError, match=f"at most {app.MAX_BATCH_FILES} at once, not {app.MAX_BATCH_FILES + 1}"):
        client.predict([handle_file(small)] * (app.MAX_BATCH_FILES + 1), *SETTINGS, api_name="/caption_many")
    with pytest.raises(AppError, match="doesn't know the word 'zebra'"):
        client.predict([handle_file(example_images[0])], *SETTINGS, "a zebra", api_name="/caption_many")


# ---- hostile requests and files ----------------------------------------------------------------------


def test_the_api_documents_the_new_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    parameters = {name: [p["parameter_name"] for p in endpoints[name]["parameters"]] for name in ("/explain", "/caption_many")}
    added = ["no_repeat_ngram_size", "temperature", "top_p", "seed", "name_objects", "model"]  # after the ones API clients already pass
    assert parameters == {
        "/explain": ["image", "method", "beam_width", "max_length", "length_penalty", "prefix", "word", *added],
        "/caption_many": ["files", "method", "beam_width", "max_length", "length_penalty", "prefix", *added],
    }
    assert all(p["parameter_has_default"] for name in parameters for p in endpoints[name]["parameters"][1:])


@pytest.mark.parametrize("form", ["file dict without meta", "file dict", "../ out of the cache", "URL"])
def test_the_new_endpoints_read_only_uploaded_files(http, served, form):
    image = {
        "file dict without meta": {"path": str(SECRET)},
        "file dict": {"path": str(SECRET), "meta": FILE_META},
        "../ out of the cache": {"path": f"{served.upload_dir}/../../{SECRET}", "meta": FILE_META},
        "URL": {"path": "http://203.0.113.7/huge.jpg", "meta": FILE_META},
    }[form]
    assert_refused(call(http, [image, *SETTINGS, None, None], api="explain"), uploads.NOT_UPLOADED)
    answer = call(http, [[image, image], *SETTINGS, None], api="caption_many")
    if answer.ok:  # each file refused in its row, with the same sentence; nothing read
        assert [row[1:] for row in answer.value[2]["data"]] == [["", uploads.NOT_UPLOADED]] * 2
        assert answer.seconds < ANSWER_S
    else:
        assert_refused(answer, uploads.NOT_UPLOADED)


@pytest.mark.parametrize("api", ["explain", "caption_many"])
def test_the_new_endpoints_answer_hostile_values_in_every_input(http, served, api):
    photo = upload(http, (app.EXAMPLES_DIR / "cat.jpg").read_bytes(), "cat.jpg")
    # The image, the settings, then prefix, (word,) n-gram size, temperature, top-p, seed: every input.
    good = [photo, *SETTINGS] + [None] * 6 if api == "explain" else [[photo], *SETTINGS] + [None] * 5
    for position in range(len(good)):
        for value in HOSTILE_VALUES:
            data = list(good)
            data[position] = value
            answer = call(http, data, api=api)
            assert answer.seconds < ANSWER_S, (position, value, answer)
            if not answer.ok:
                assert isinstance(answer.value, str) and SENTENCE.fullmatch(answer.value), (position, value, answer)
            assert "root:" not in json.dumps(answer.value)
    assert call(http, good, api=api).ok  # and it still serves


@pytest.fixture(scope="module")
def corpus_uploads(http) -> dict[str, dict]:
    """The hostile corpus uploaded (files over the upload limit are refused by the client and the server: left out)."""
    return {name: upload(http, data, name) for name, (data, _) in hostile_files().items() if len(data) <= MAX_FILE_BYTES}


def test_the_hostile_corpus_through_many_photos(http, corpus_uploads):
    names = list(corpus_uploads)
    expected = {name: outcome for name, (_, outcome) in hostile_files().items()}
    for start in range(0, len(names), app.MAX_BATCH_FILES):
        batch = names[start : start + app.MAX_BATCH_FILES]
        answer = call(http, [[corpus_uploads[n] for n in batch], *SETTINGS, None], api="caption_many")
        assert answer.ok, answer
        rows = answer.value[2]["data"]
        assert [row[0] for row in rows] == batch
        for name, caption, error, _ in rows:
            if expected[name] == CAPTION:
                assert caption.strip() and not error, (name, error)
            else:
                assert not caption and SENTENCE.fullmatch(error), (name, error)


@pytest.mark.parametrize("name", ["bomb_30000x30000.png", "chunk_flood.png", "scan_flood.jpg", "iccp_flood.png",
                                  "largest_legal.png", "tiny_1x1.png", "row_40000000x1.png", "animated.gif", "cmyk.jpg"])
def test_the_hostile_corpus_through_explain(http, corpus_uploads, name):
    answer = call(http, [corpus_uploads[name], *SETTINGS, None, None], api="explain")
    assert answer.seconds < ANSWER_S, answer
    if hostile_files()[name][1] == CAPTION:
        assert answer.ok and answer.value[0].strip(), answer
    else:
        assert_refused(answer)
