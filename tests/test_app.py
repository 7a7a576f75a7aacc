"""The Gradio app: its /caption endpoint on a real server (gradio_client), and its layout built in-process.
(The handlers themselves, called without a server: tests/test_handlers.py.)"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
from benchmarks.app_process import running_app

# The decoding settings every endpoint takes after its image: the first five in the order API clients have always
# passed them, then the ones added later (optional), then the model choice (tests/test_model_choice.py).
SETTINGS = ["method", "beam_width", "max_length", "length_penalty", "prefix", "no_repeat_ngram_size", "temperature",
            "top_p", "seed", "name_objects", "model"]


@pytest.fixture(scope="module")
def app_url(tiny_weights):
    with running_app(tiny_weights) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url) -> Client:
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, example_images) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_files")
    jpeg = example_images[0].read_bytes()
    contents = {
        "text renamed .jpg": b"This is a text file, not a photo.\n",
        "truncated JPEG": jpeg[: len(jpeg) // 3],
        "empty file": b"",
    }
    paths = {name: folder / f"{index}.jpg" for index, name in enumerate(contents)}
    for name, data in contents.items():
        paths[name].write_bytes(data)
    return paths


def table_rows(table: dict) -> list[list]:
    assert table["headers"] == app.CANDIDATE_HEADERS
    return table["data"]


# ---- the real server ----------------------------------------------------------------------------


def test_greedy_caption(client, example_images):
    text, table, facts, seen = client.predict(handle_file(example_images[0]), "greedy", 5, api_name="/caption")
    assert text.strip()
    assert [row[:2] for row in table_rows(table)] == [[1, text]]
    assert "mobilenet_v2" in facts and "this caption took" in facts
    assert seen == {"objects": [], "familiar": None, "familiarity": None}  # the tiny folder has no classifier


@pytest.mark.parametrize("method", ["beam", "Beam search"])  # the API value and the radio's label
def test_beam_caption_lists_sorted_distinct_candidates(client, example_images, method):
    text, table, *_ = client.predict(handle_file(example_images[1]), method, 5, length_penalty=0.0, api_name="/caption")
    rows = table_rows(table)
    assert text.strip() and rows[0][1] == text
    assert 1 < len(rows) <= 5
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1))
    log_probs = [row[3] for row in rows]
    assert log_probs == sorted(log_probs, reverse=True)  # no length penalty: ranked by log-probability
    assert len({row[1] for row in rows}) == len(rows)
    for _, _, score, log_prob, probability in rows:
        assert score == log_prob  # no length penalty: the score is the log-probability
        assert probability.endswith("%") or probability.startswith(("1 in", "under 1 in"))


def test_advanced_options(client, example_images):
    text, table, *_ = client.predict(handle_file(example_images[0]), "beam", 3, 3, 1.0, api_name="/caption")
    assert all(len(row[1].split()) <= 3 for row in table_rows(table))
    assert text == table_rows(table)[0][1]


def test_the_added_settings_are_optional_and_trailing(client, example_images):
    """Calls with the first five settings by position keep working; the later ones go after them, or by name."""
    photo = handle_file(example_images[2])
    by_position = client.predict(photo, "beam", 3, None, 0.0, "", 2, api_name="/caption")[0]
    assert by_position == client.predict(photo, "beam", 3, length_penalty=0.0, no_repeat_ngram_size=2, api_name="/caption")[0]
    sampled = {client.predict(photo, "sample", temperature=1.5, top_p=1.0, seed=7, api_name="/caption")[0] for _ in range(2)}
    assert len(sampled) == 1  # the same seed, the same caption


@pytest.mark.parametrize("name", ["text renamed .jpg", "truncated JPEG", "empty file"])
def test_bad_file_gets_a_clear_message_and_the_server_keeps_serving(client, bad_files, example_images, name):
    expected = {
        "text renamed .jpg": "not an image in a format we can read",
        "truncated JPEG": "damaged",
        "empty file": "The file is empty.",
    }[name]
    with pytest.raises(AppError, match=expected):
        client.predict(handle_file(bad_files[name]), "greedy", 5, api_name="/caption")
    assert client.predict(handle_file(example_images[0]), "greedy", 5, api_name="/caption")[0].strip()


def test_files_over_the_size_limit_are_refused(client, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (app.MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks the server's limit
        client.predict(handle_file(big), api_name="/caption")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None,), "Please upload an image"),
        ((handle_file(Path(__file__)),), "not an image"),  # a non-image file under its real name
        (("IMAGE", "nucleus", 5), "The decoding method must be .*, not 'nucleus'"),
        (("IMAGE", "beam", 50), "Beam width must be between 1 and 10"),
        (("IMAGE", "beam", 5, 500), "Max new tokens must be between 1 and 100"),
        (("IMAGE", "beam", 5, 10, -1), "Length penalty must be between 0 and 5"),
        (("IMAGE", "greedy", 5, 10, 0, "", 1), "No-repeat n-gram size must be one of 0, 2, 3, 4"),
    ],
)
def test_bad_requests_get_clear_messages(client, example_images, args, message):
    args = tuple(handle_file(example_images[0]) if arg == "IMAGE" else arg for arg in args)
    with pytest.raises(AppError, match=message) as error:
        client.predict(*args, api_name="/caption")
    assert "Traceback" not in str(error.value)


def test_api_describes_the_caption_endpoint(client):
    parameters = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/caption"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == ["image", *SETTINGS]
    assert [p["parameter_has_default"] for p in parameters] == [False] + [True] * len(SETTINGS)


@pytest.fixture(scope="module")
def no_weights_url(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("no_weights")) as url:
        yield url


def test_without_weights_the_page_opens_and_explains(no_weights_url, example_images):
    with urllib.request.urlopen(no_weights_url + "/config", timeout=10) as response:
        config = response.read().decode()
    assert "The captioning model isn't loaded" in config and "python -m training.run_all" in config

    with pytest.raises(AppError, match=r"isn't loaded.*python -m training\.run_all"):
        Client(no_weights_url, verbose=False).predict(handle_file(example_images[0]), api_name="/caption")


# ---- the layout, built in-process ---------------------------------------------------------------


def test_without_a_model_the_notice_says_what_to_do():
    demo = app.build_demo(None, "weights/decoder.weights.h5 does not match the checksum.")
    config = json.dumps(demo.config, default=repr)  # (a gr.State's config holds its delete callback)
    assert "does not match the checksum." in config and "python -m training.run_all" in config


def test_build_demo_without_launching(tiny_captioner):
    parameters = app.build_demo(tiny_captioner).get_api_info()["named_endpoints"]["/caption"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == ["image", *SETTINGS]
