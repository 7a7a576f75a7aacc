"""The page's handlers (webapp/handlers.py) called directly, without a server: a tiny random captioner, the
example photos as uploads, real decode workers. Refusals are gr.Error with a sentence for the user.
(tests/test_app.py and test_app_views.py call the same handlers through a running app.)"""

from __future__ import annotations

import csv
import inspect
import io
import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from captioner import Caption, DecodingOptions
from webapp import handlers, uploads
from webapp.handlers import CaptionPage, ExplainedPhoto, decoding_options
from webapp.uploads import RequestImages

GREEDY = ("greedy", None, None, None)  # method, beam width, max length, length penalty


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gradio-uploads")


@pytest.fixture(scope="module")
def page(tiny_captioner, example_images, upload_dir):
    images = RequestImages(tiny_captioner.encoder.input_size, example_images, upload_dir=upload_dir)
    yield CaptionPage(tiny_captioner, example_images, images=images)
    images.pool.close()


@pytest.fixture(scope="module")
def uploaded(upload_dir, example_images) -> list[dict]:
    """The example photos as Gradio's raw file objects for files uploaded to its cache."""
    files = []
    for index, path in enumerate(example_images):
        folder = upload_dir / str(index)
        folder.mkdir()
        files.append({"path": str(shutil.copy(path, folder / path.name)), "orig_name": path.name})
    return files


def upload(upload_dir: Path, name: str, data: bytes) -> dict:
    folder = upload_dir / f"extra-{len(list(upload_dir.iterdir()))}"
    folder.mkdir()
    (folder / name).write_bytes(data)
    return {"path": str(folder / name), "orig_name": name}


def refusal(call, *args, **kwargs) -> str:
    """The sentence a handler refuses a request with."""
    with pytest.raises(gr.Error) as error:
        call(*args, **kwargs)
    message = error.value.message
    assert "Traceback" not in message
    return message


# ---- widget values -> DecodingOptions ---------------------------------------------------------------


def test_decoding_options_map_the_widgets_to_the_library_options():
    assert decoding_options("Beam search", 4.0, 12.0, 0.5) == DecodingOptions("beam", 4, 12, 0.5)
    # Greedy ignores the beam width; None means the recommended decoding's value.
    assert decoding_options("greedy", 99, None, None) == DecodingOptions("greedy")
    assert decoding_options(None, None, None, None) == DecodingOptions()
    assert decoding_options("greedy", None, None, None, "a dog", 2.0) == DecodingOptions("greedy", prefix="a dog", no_repeat_ngram_size=2)
    # Sampling's settings count only for sampling: the page sends them whatever the method.
    assert decoding_options("beam", 3, None, None, None, None, 7.0, 0.0, "x") == DecodingOptions("beam", 3)
    for given, message in [("nucleus", "not 'nucleus'"), (3, "not 3")]:
        with pytest.raises(ValueError, match=message):
            decoding_options(given, 5, None, None)
    with pytest.raises(ValueError, match="No-repeat n-gram size must be one of 0, 2, 3, 4"):
        decoding_options("greedy", None, None, None, None, 1)


def test_sampling_options():
    options = decoding_options("Sampling", 99, None, None, None, None, 0.7, 0.9, 42.0)
    assert options == DecodingOptions("sample", temperature=0.7, top_p=0.9, seed=42)
    assert decoding_options("sample", None, None, None).seed is None  # no seed: a new sample each time
    assert decoding_options("sample", None, None, None, None, None, None, None, " ").seed is None  # the page's box, empty
    assert decoding_options("sample", None, None, None, None, None, None, None, "7").seed == 7
    for seed, message in [("seven", "Seed must be a number, not 'seven'"), ("7.5", "Seed must be a whole number")]:
        with pytest.raises(ValueError, match=message):
            decoding_options("sample", None, None, None, None, None, None, None, seed)


def test_the_handlers_parameters_are_the_apis():
    """Gradio names an endpoint's parameters after its handler's; the settings come in the same order everywhere,
    /explain's `word` stays 7th, where API clients have always passed it, and the model choice comes last."""
    settings = ["method", "beam_width", "max_length", "length_penalty", "prefix", "no_repeat_ngram_size", "temperature",
                "top_p", "seed", "name_objects"]
    parameters = {name: list(inspect.signature(getattr(CaptionPage, name)).parameters)[1:]
                  for name in ("caption", "explain", "explain_example", "caption_many")}
    assert parameters == {
        "caption": ["image", *settings, "model"],
        "explain": ["image", *settings[:5], "word", *settings[5:], "model"],
        "explain_example": ["index", *settings, "model"],
        "caption_many": ["files", *settings, "model", "progress"],
    }
    assert list(inspect.signature(decoding_options).parameters) == settings


# ---- one photo --------------------------------------------------------------------------------------


def test_caption_is_the_librarys_caption(page, tiny_captioner, uploaded, example_images):
    text, rows, facts, seen = page.caption(uploaded[1], "beam", 3, None, 0.0)
    expected = tiny_captioner.caption(example_images[1], method="beam", beam_width=3, length_penalty=0.0)
    assert text == expected.text
    assert seen == {"objects": [], "familiar": None, "familiarity": None}  # the tiny folder has no classifier
    assert [row[1] for row in rows] == [candidate for candidate, _ in expected.candidates]
    assert rows == handlers.candidate_rows(expected)
    assert "this caption took" in facts and "mobilenet_v2" in facts


def test_every_setting_reaches_the_library(page, tiny_captioner, uploaded, example_images):
    settings = ("beam", 4, 5, 1.0, "a dog", 2)
    text, rows, *_ = page.caption(uploaded[2], *settings)
    expected = tiny_captioner.caption(example_images[2], decoding_options(*settings))
    assert text == expected.text and text.startswith("a dog")
    assert len(rows) == len(expected.candidates) > 1


def test_sampling_on_the_page(page, tiny_captioner, uploaded):
    sampled = [page.caption(uploaded[0], "sample", None, None, None, None, 0, 1.5, 1.0, 7)[0] for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same caption
    greedy = page.caption(uploaded[0], *GREEDY)[0]
    assert page.caption(uploaded[0], "sample", None, None, None, None, 0, 1.0, 1e-6, None)[0] == greedy  # tiny top-p
    view = page.explain(uploaded[0], "sample", None, None, None, None, None, 0, 1.5, 1.0, 7)
    assert view[0] == sampled[0]


def test_explain_gives_each_word_with_its_probability_and_heatmap(page, tiny_captioner, uploaded, example_images):
    text, words, heatmap, note, rows, facts, seen, seen_data, kept = page.explain(uploaded[1], "beam", 3, None, 0.0)
    explanation = tiny_captioner.explain(example_images[1], method="beam", beam_width=3, length_penalty=0.0)
    assert text == explanation.text == page.caption(uploaded[1], "beam", 3, None, 0.0)[0]
    assert words == [(w.word, round(w.probability, 3)) for w in explanation.words]
    # Drawn on the photo in its own shape, not the encoder's square; the first word that names something.
    assert heatmap.size == Image.open(example_images[1]).size != (224, 224)
    index = explanation.first_content_word
    assert f"\u201c{explanation.words[index].word}\u201d** (word {index + 1}," in note
    assert isinstance(kept, ExplainedPhoto) and kept.words == tuple(text.split())
    assert np.abs(np.asarray(kept.overlay(index), float) - np.asarray(heatmap, float)).mean() < 1e-9
    assert rows[0][1] == text and "this caption took" in facts
    assert seen == "" and seen_data["objects"] == []  # the tiny folder has no classifier


def test_explain_draws_the_word_asked_for(page, uploaded):
    words = page.explain(uploaded[0], *GREEDY)[1]
    last = len(words) - 1
    assert f"(word {last + 1}," in page.explain(uploaded[0], *GREEDY, None, last)[3]
    for word, message in [(last + 1, "The word to show must be a whole number from 0 to"), (1.5, "from 0 to"),
                          ("dog", "The word to show must be its position")]:
        assert message in refusal(page.explain, uploaded[0], *GREEDY, None, word)


def test_an_example_click_shows_the_example_with_the_pages_settings(page, uploaded):
    shown, *view = page.explain_example(2, "beam", 3, None, 0.0)
    assert shown == page.examples[2]
    assert view[0] == page.explain(uploaded[2], "beam", 3, None, 0.0)[0]
    assert refusal(page.explain_example, 99, *GREEDY) == uploads.NOT_AN_EXAMPLE


def test_a_click_on_a_word_shows_its_heatmap(page, uploaded):
    *_, kept = page.explain(uploaded[0], *GREEDY)
    heatmap, note = page.show_word(kept, gr.SelectData(None, {"index": 1, "value": kept.words[1]}))
    assert heatmap.size == kept.overlay(1).size and "(word 2, " in note
    # A click that doesn't name a word of the kept caption (or comes before any caption) changes nothing.
    for stale, index in [(kept, 99), (kept, "1"), (None, 0)]:
        assert page.show_word(stale, gr.SelectData(None, {"index": index, "value": ""})) == (gr.update(), gr.update())


@pytest.mark.parametrize(
    ("image", "settings", "message"),
    [
        (None, {}, "Please upload an image first"),
        ({"path": str(app.EXAMPLES_DIR / "dog.jpg")}, {}, uploads.NOT_UPLOADED),  # a server file, not an upload
        ("UPLOAD", {"method": "nucleus"}, "not 'nucleus'"),
        ("UPLOAD", {"method": "beam", "beam_width": 50}, "Beam width must be between 1 and 10"),
        ("UPLOAD", {"max_length": 500}, "Max new tokens must be between 1 and 100"),
        ("UPLOAD", {"prefix": "a zebra"}, "doesn't know the word 'zebra'"),
        ("UPLOAD", {"no_repeat_ngram_size": 1}, "No-repeat n-gram size must be one of 0, 2, 3, 4"),
        ("UPLOAD", {"method": "sample", "temperature": 0}, "Temperature must be"),
        ("UPLOAD", {"method": "sample", "top_p": 2}, "Top-p must be"),
    ],
)
def test_refusals_are_sentences(page, uploaded, image, settings, message):
    image = uploaded[0] if image == "UPLOAD" else image
    for handler in (page.caption, page.explain):
        shown = refusal(handler, image, **{"method": "greedy", **settings})
        assert message in shown
        assert shown[0].isupper() and shown.endswith((".", "?"))


def test_a_file_that_isnt_an_image_gets_its_reason(page, upload_dir):
    notes = upload(upload_dir, "notes.jpg", b"This is a text file, not a photo.\n")
    assert "not an image in a format we can read" in refusal(page.caption, notes, *GREEDY)


def test_without_a_model_every_handler_says_why_and_what_to_do(example_images):
    page = CaptionPage(None, example_images, "weights/decoder.weights.h5 does not match the checksum.")
    assert page.images is None and page.facts == ""
    for handler in (page.caption, page.explain, page.explain_example, page.caption_many):
        message = refusal(handler, None)
        assert message.startswith(handlers.NOT_LOADED) and "does not match the checksum." in message
        assert "python -m training.run_all" in message


# ---- many photos ------------------------------------------------------------------------------------


def test_many_photos_each_get_a_caption_or_their_error(page, tiny_captioner, uploaded, upload_dir, example_images):
    notes = upload(upload_dir, "=notes.jpg", b"not a photo")
    files = [uploaded[0], notes, uploaded[1]]
    steps = []
    gallery, summary, table, downloads = page.caption_many(files, *GREEDY, progress=lambda step, **_: steps.append(step))
    singles = [tiny_captioner.caption(example_images[i], method="greedy").text for i in (0, 1)]
    names = [uploaded[0]["orig_name"], "=notes.jpg", uploaded[1]["orig_name"]]
    # The last column: what the classifier sees (the tiny folder has none).
    assert table == [[names[0], singles[0], "", ""], [names[1], "", table[1][2], ""], [names[2], singles[1], "", ""]]
    assert "not an image" in table[1][2]
    assert [caption for _, caption in gallery] == [f"{uploaded[i]['orig_name']}: {singles[i]}" for i in (0, 1)]
    scale = min(1.0, handlers.GALLERY_MAX_SIDE / max(Image.open(example_images[1]).size))
    assert gallery[1][0].size == tuple(round(side * scale) for side in Image.open(example_images[1]).size)
    assert "**2 of 3** photos" in summary and "1 file has no caption" in summary
    assert steps[0] == (0, 3) and steps[-1] == (3, 3)

    csv_file, json_file = sorted(downloads, key=lambda p: Path(p).suffix)
    assert [r["caption"] for r in json.loads(Path(json_file).read_text())] == [singles[0], None, singles[1]]
    lines = list(csv.DictReader(io.StringIO(Path(csv_file).read_text())))
    assert lines[1]["image"] == "'=notes.jpg"  # shown as text by a spreadsheet, not run as a formula


def test_many_photos_refuses_none_or_too_many(page, uploaded):
    assert refusal(page.caption_many, [], *GREEDY) == "Please choose some photos first."
    too_many = [uploaded[0]] * (handlers.MAX_BATCH_FILES + 1)
    assert refusal(page.caption_many, too_many, *GREEDY) == f"Too many photos: at most {handlers.MAX_BATCH_FILES} at once, not {handlers.MAX_BATCH_FILES + 1}."
    assert "doesn't know the word 'zebra'" in refusal(page.caption_many, [uploaded[0]], *GREEDY, "a zebra")


# ---- what the page shows ----------------------------------------------------------------------------


def test_candidate_rows():
    caption = Caption("a dog runs", [("a dog runs", -1.0), ("a dog", -2.5)], [-0.5, -1.5])
    assert handlers.candidate_rows(caption) == [[1, "a dog runs", -0.5, -1.0, "37%"], [2, "a dog", -1.5, -2.5, "8.2%"]]


@pytest.mark.parametrize(
    ("probability", "shown"),
    [(0.934, "93%"), (0.0123, "1.2%"), (0.0099, "1 in 100"), (3.1e-4, "1 in 3,200"), (1.5e-7, "1 in 6.7 million"),
     (2e-10, "1 in 5 billion"), (1e-13, "1 in 10 trillion"), (1e-20, "under 1 in a quadrillion")],
)
def test_probabilities_read_as_percentages_or_odds(probability, shown):
    assert handlers.readable_probability(probability) == shown


def test_model_facts():
    description = {
        "encoder": "resnet50", "vocab_size": 8123, "source": "Hub user/captioner@0123456789", "revision": "0123456789abcdef",
        "metrics": {"best": "beam3", "results": {"beam3": {"BLEU-4": 0.2134, "CIDEr": 0.5412, "METEOR": 0.2}}},
    }
    facts = handlers.model_facts(description, seconds=0.4321)
    assert facts == (
        "Encoder `resnet50` · weights from `Hub user/captioner@0123456789` (revision `0123456789`) · vocabulary of 8,123 tokens"
        " · test BLEU-4 0.213, CIDEr 0.541 (beam3) · this caption took 0.43 s"
    )
    bare = handlers.model_facts({"encoder": "resnet50", "vocab_size": 10, "source": "weights/", "revision": None, "metrics": None})
    assert bare == "Encoder `resnet50` · weights from `weights/` · vocabulary of 10 tokens"
    int8 = handlers.model_facts({"encoder": "efficientnet_lite0", "decoder": "int8", "vocab_size": 10, "source": "weights/"})
    assert int8 == "Encoder `efficientnet_lite0` · decoder step int8 · weights from `weights/` · vocabulary of 10 tokens"
