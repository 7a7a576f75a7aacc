"""The page's model choice (webapp/models.py): the `model` parameter of /caption, /explain and /caption_many on a
real Gradio server (in this process, so that the tests can count loads), with tiny random models standing in for the
bundled ones: a second tiny model, an ensemble of the two, a model that loads slowly, one that can't be loaded. Then
the bundled models themselves (the real ResNet50 and ensemble, where this machine can load them), and ResNet50 where
TensorFlow is missing (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
from benchmarks.app_process import free_port
from captioner import Captioner, Ensemble
from captioner.backends import KerasMissing
from captioner.ensemble import ensemble_weights, read_ensemble_folder
from captioner.image import MAX_FILE_BYTES
from tests.conftest import ROOT, make_weights_folder
from webapp import middleware, uploads
from webapp.handlers import CaptionPage
from webapp.models import (BUNDLED_ENSEMBLE, BUNDLED_LITE1_ENSEMBLE, RESNET50_FIX, ModelChoice, ModelChoices, ModelUnavailable,
                           bundled_choices)

SECOND_REQUEST_WAIT_S = 30  # how long the slow model's load waits for a second request to choose it too


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory) -> Path:
    """A second tiny model: the same words as tiny_weights, other random weights."""
    return make_weights_folder(tmp_path_factory.mktemp("other_weights"), seed=1)


@pytest.fixture(scope="module")
def other_captioner(other_folder) -> Captioner:
    return Captioner.from_pretrained(other_folder)


class Loads:
    """Loaders that count their calls (by the choice's name) and the warmups of what they load."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.warmups: dict[str, int] = {}
        self.asked: list[str] = []  # each request for the slow model, as it asks for it
        self.asked_during_load = 0  # how many had asked when its load finished

    def counted(self, name: str, load):
        def counted_load():
            self.calls[name] = self.calls.get(name, 0) + 1
            model = load()
            warmup = model.warmup

            def counted_warmup():
                self.warmups[name] = self.warmups.get(name, 0) + 1
                warmup()

            model.warmup = counted_warmup
            return model

        return counted_load


def cant_load():
    raise KerasMissing("The resnet50 encoder has to be built in Keras here, and Keras/TensorFlow isn't installed.")


def tiny_choices(tiny_captioner, other_folder, loads: Loads) -> list[ModelChoice]:
    other = ModelChoice("other", "Other tiny model", loads.counted("other", lambda: Captioner.from_pretrained(other_folder)),
                        about="A second tiny model.")
    broken = ModelChoice("broken", "Broken model", loads.counted("broken", cant_load), fix=RESNET50_FIX)
    return [
        other,
        ModelChoice("pair", "Tiny ensemble", lambda: Ensemble([tiny_captioner, other.model()], (0.5, 0.5))),
        slow_choice(loads, other_folder),
        broken,
        ModelChoice("broken-pair", "Broken ensemble", lambda: Ensemble([tiny_captioner, broken.model()])),
    ]


def slow_choice(loads: Loads, other_folder) -> ModelChoice:
    """A model whose load lasts until a second request has asked for it too (or SECOND_REQUEST_WAIT_S)."""
    def load():
        deadline = time.monotonic() + SECOND_REQUEST_WAIT_S
        while len(loads.asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        loads.asked_during_load = len(loads.asked)
        return Captioner.from_pretrained(other_folder)

    choice = ModelChoice("slow", "Slow tiny model", loads.counted("slow", load))
    model = choice.model

    def asked():
        loads.asked.append("slow")
        return model()

    choice.model = asked
    return choice


@pytest.fixture(scope="module")
def served(tiny_captioner, other_folder):
    """The app with the tiny choices, launched in this process as app.main launches it: (url, its page, the loads)."""
    loads = Loads()
    demo = app.build_demo(tiny_captioner, more_models=tiny_choices(tiny_captioner, other_folder, loads))
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                max_file_size=MAX_FILE_BYTES, allowed_paths=[str(app.EXAMPLES_DIR)],
                **middleware.launch_options(demo, max_files_per_upload=app.MAX_BATCH_FILES))
    page = next(fn.fn.__self__ for fn in demo.fns.values() if isinstance(getattr(fn.fn, "__self__", None), CaptionPage))
    try:
        yield demo.local_url.rstrip("/"), page, loads
    finally:
        demo.close()
        page.images.pool.close()


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[0], verbose=False)


# ---- on a real server ------------------------------------------------------------------------------------


def test_the_menu_lists_the_default_first_and_chosen(served, tiny_captioner):
    _, page, _ = served
    assert [name for _, name in page.models.menu()] == ["default", "other", "pair", "slow", "broken", "broken-pair"]
    demo = app.build_demo(tiny_captioner, more_models=[ModelChoice("other", "Other tiny model", cant_load)])
    (dropdown,) = [c for c in demo.config["components"] if c["props"].get("elem_id") == "model"]
    assert dropdown["props"]["value"] == "default" and dropdown["props"]["visible"] is not False
    assert [value for _, value in dropdown["props"]["choices"]] == ["default", "other"]
    assert dropdown["props"]["choices"][0][0] == "MobileNetV2 (default)"
    # With only the default there is nothing to choose: no menu, but the API keeps its `model` parameter.
    alone = app.build_demo(tiny_captioner, more_models=[])
    hidden_rows = [c for c in alone.config["components"] if c["type"] == "row" and c["props"].get("visible") is False]
    assert len(hidden_rows) == 1  # the menu's
    assert [p["parameter_name"] for p in alone.get_api_info()["named_endpoints"]["/caption"]["parameters"]][-1] == "model"


def test_each_model_gives_its_own_caption(client, tiny_captioner, other_captioner, example_images):
    photo = example_images[1]
    expected = {
        "default": tiny_captioner.caption(photo, method="greedy").text,
        "other": other_captioner.caption(photo, method="greedy").text,
        "pair": Ensemble([tiny_captioner, other_captioner], (0.5, 0.5)).caption(photo, method="greedy").text,
    }
    assert len(set(expected.values())) > 1  # the models differ, so the answers say which one was used
    labels = {"default": "MobileNetV2 (default)", "other": "Other tiny model", "pair": "Tiny ensemble"}
    for name, text in expected.items():
        caption, table, facts, _ = client.predict(handle_file(photo), "greedy", model=name, api_name="/caption")
        assert caption == text and table["data"][0][1] == text, name
        assert facts.startswith(f"**{labels[name]}** \u00b7 ") and "this caption took" in facts  # the facts name the model
        explained = client.predict(handle_file(photo), "greedy", model=name, api_name="/explain")
        assert explained[0] == text and [w["token"] for w in explained[1]] == text.split()
        assert explained[5].startswith(f"**{labels[name]}**")
        table = client.predict([handle_file(photo)], "greedy", model=name, api_name="/caption_many")[2]
        assert table["data"][0][1] == text, name
    pair_facts = client.predict(handle_file(photo), "greedy", model="pair", api_name="/caption")[2]
    assert "Encoders `mobilenet_v2 (0.5) + mobilenet_v2 (0.5)`" in pair_facts


def test_without_a_model_the_default_answers_as_before(client, tiny_captioner, example_images):
    photo = handle_file(example_images[2])
    text = tiny_captioner.caption(example_images[2], method="beam", beam_width=3).text
    assert client.predict(photo, "beam", 3, api_name="/caption")[0] == text
    for default in (None, "", "default", " Default "):
        assert client.predict(photo, "beam", 3, model=default, api_name="/caption")[0] == text


def test_an_ensembles_heatmaps_are_its_heaviest_members_and_say_so(client, example_images):
    note = client.predict(handle_file(example_images[0]), "greedy", model="pair", api_name="/explain")[3]
    assert note.startswith("Where the ensemble's MobileNetV2 member looked for")
    assert client.predict(handle_file(example_images[0]), "greedy", api_name="/explain")[3].startswith("Where the model looked for")


@pytest.mark.parametrize("name", ["nope", "ResNet-50", 3, "x" * 4000])
def test_an_unknown_model_gets_the_choices(client, example_images, name):
    for api in ("/caption", "/explain"):
        with pytest.raises(AppError) as error:
            client.predict(handle_file(example_images[0]), model=name, api_name=api)
        message = str(error.value)
        assert "There is no model " in message and "here; choose one of 'default' (MobileNetV2 (default)), 'other' (Other tiny model)," in message
        assert len(message) <= uploads.MAX_MESSAGE_CHARS + 50
    with pytest.raises(AppError, match="There is no model 'nope' here; choose one of"):
        client.predict([handle_file(example_images[0])], model="nope", api_name="/caption_many")


def test_concurrent_requests_load_a_model_once(served, client, example_images):
    _, page, loads = served
    assert "slow" not in loads.calls and not page.models.choices["slow"].is_loaded  # nothing loaded before its first use
    photo = handle_file(example_images[3])
    jobs = [client.submit(photo, "greedy", model="slow", api_name="/caption") for _ in range(2)]
    captions = {job.result(timeout=120)[0] for job in jobs}
    assert len(captions) == 1
    assert loads.asked_during_load == 2  # the second request came while the first was loading the model
    assert loads.calls["slow"] == 1 and loads.warmups["slow"] == 1  # loaded and warmed up once, for both requests
    client.predict(photo, "greedy", model="slow", api_name="/caption")
    assert loads.calls["slow"] == 1


def test_a_model_that_cant_be_loaded_says_what_to_do_and_the_others_keep_working(served, client, example_images):
    _, page, loads = served
    photo = handle_file(example_images[0])
    expected = ("Broken model can't be loaded on this server: its encoder needs TensorFlow, which isn't installed here. "
                "To offer it: `pip install -r training/requirements.txt` (TensorFlow) and `python -m training.convert_encoder "
                "--encoder resnet50` (its ImageNet weights, which Keras would otherwise download), then restart the app.")
    for api in ("/caption", "/explain", "/caption"):
        with pytest.raises(AppError) as error:
            client.predict(photo, "greedy", model="broken", api_name=api)
        assert str(error.value) == expected
    assert loads.calls["broken"] == 1  # the failure is remembered: not tried again on every request
    with pytest.raises(AppError) as error:  # an ensemble with it says which member it needs
        client.predict(photo, "greedy", model="broken-pair", api_name="/caption")
    assert str(error.value) == f"The Broken ensemble needs Broken model. {expected}"
    # The menu marks it; the facts line and the line under the menu say so.
    assert ("Broken model (can't be loaded here)", "broken") in page.models.menu()
    assert page.facts_for("broken") == "**Broken model** \u00b7 can't be loaded here"
    assert page.model_status("broken") == f"**Broken model** {expected}"
    # The other models still answer.
    for name in ("default", "other", "pair"):
        assert client.predict(photo, "greedy", model=name, api_name="/caption")[0].strip()


# ---- the registry, without a server -------------------------------------------------------------------------


def test_threads_choosing_an_unloaded_model_load_it_once(tiny_captioner, other_folder):
    loads = Loads()
    choice = ModelChoice("other", "Other", loads.counted("other", lambda: (time.sleep(0.5), Captioner.from_pretrained(other_folder))[1]))
    models = ModelChoices(tiny_captioner, [choice])
    got, start = [], threading.Barrier(8)

    def request():
        start.wait()
        got.append(models.get("other")[1])

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and len({id(model) for model in got}) == 1
    assert loads.calls == {"other": 1} and loads.warmups == {"other": 1}
    assert models.get(None)[1] is tiny_captioner and models.get("default")[1] is tiny_captioner


def test_a_failed_load_is_a_sentence_not_a_crash(tiny_captioner):
    def damaged():
        raise OSError("Unable to open file (truncated file: eof = 123)")

    models = ModelChoices(tiny_captioner, [ModelChoice("damaged", "Damaged", damaged, fix="Copy the folder again.")])
    with pytest.raises(ModelUnavailable) as error:
        models.get("damaged")
    assert str(error.value) == "Damaged can't be loaded on this server: loading it failed (the server's log says why). Copy the folder again."
    assert "eof" not in str(error.value)  # what failed inside stays in the log


# ---- the bundled models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_page(example_images, tmp_path_factory, resnet50_imagenet):
    """The page as `python app.py` builds it: the bundled Lite0 + Lite1 ensemble the default and, to choose, Lite0
    alone, ResNet50 and the Lite0 + ResNet50 ensemble."""
    lite0 = Captioner.from_pretrained(None)
    lite0.warmup()
    upload_dir = tmp_path_factory.mktemp("bundled-uploads")
    page = CaptionPage(lite0, example_images, more_models=bundled_choices(lite0),
                       images=uploads.RequestImages(lite0.encoder.input_size, example_images, upload_dir=upload_dir))
    try:
        page.models.get("resnet50")
    except ModelUnavailable as exc:  # (no TensorFlow, or no ResNet50 weights: the next test covers the sentence)
        page.images.pool.close()
        pytest.skip(f"ResNet50 can't be loaded on this machine: {exc}")
    yield page, upload_dir
    page.images.pool.close()


def test_the_bundled_models(bundled_page, example_images):
    page, upload_dir = bundled_page
    photo = example_images[4]
    (upload_dir / "0").mkdir(exist_ok=True)
    upload = {"path": str((upload_dir / "0" / photo.name).resolve()), "orig_name": photo.name}
    Path(upload["path"]).write_bytes(photo.read_bytes())
    folders = ("", "resnet50", "ensemble", "ensemble-lite1")
    metrics = {name: json.loads((ROOT / "weights" / name / "metrics.json").read_text()) for name in folders}
    cider = {name: f"{m['results'][m['best']]['CIDEr']:.3f}" for name, m in metrics.items()}  # the folders' own evaluations
    # The default first: the ensemble of Lite0 and Lite1, the best on dev that needs no TensorFlow (issue 20).
    assert page.models.menu() == [
        (f"Lite0 + Lite1 ensemble (default) \u00b7 test CIDEr {cider['ensemble-lite1']}", "ensemble-lite1"),
        (f"EfficientNet-Lite0 \u00b7 test CIDEr {cider['']}", "lite0"),
        (f"ResNet50 \u00b7 test CIDEr {cider['resnet50']}", "resnet50"),
        (f"Lite0 + ResNet50 ensemble \u00b7 test CIDEr {cider['ensemble']}", "ensemble")]
    with_lite1, lite0 = page.models.get(None)[1], page.models.get("lite0")[1]
    assert page.models.get("default")[1] is page.models.get("ensemble-lite1")[1] is with_lite1
    assert page.models.default.is_loaded  # at start, not by the first visitor
    resnet50 = page.models.get("resnet50")[1]
    assert page.models.choices["resnet50"].is_loaded and not page.models.choices["ensemble"].is_loaded
    ensemble = page.models.get("ensemble")[1]
    assert ensemble.members[0] is lite0 and ensemble.members[1] is resnet50  # shared, not loaded again
    assert with_lite1.members[0] is lite0 and with_lite1.members[1].config.encoder == "efficientnet_lite1"
    assert page.caption(upload)[0] == with_lite1.caption(photo).text
    for name, model, expected in [("lite0", lite0, lite0.caption(photo)),
                                  ("resnet50", resnet50, resnet50.caption(photo)),
                                  ("ensemble", ensemble, ensemble.caption(photo)),
                                  ("ensemble-lite1", with_lite1, with_lite1.caption(photo))]:
        text, rows, facts, seen = page.caption(upload, model=name)
        assert text == expected.text and rows[0][1] == text
        label = page.models.choices[name].label
        assert facts.startswith(f"**{label}** \u00b7 ") and "CIDEr" in facts
        assert "bundled weights/" in facts and str(ROOT) not in facts  # the folders named, not the server's paths
    # ResNet50 has no classifier; the ensemble shows Lite0's, and Lite0's flag (it reads the photo, not the caption).
    assert page.caption(upload, model="resnet50")[3] == {"objects": [], "familiar": None, "familiarity": None}
    seen, alone = page.caption(upload, model="ensemble")[3], page.caption(upload, model="lite0")[3]
    assert seen["objects"] == alone["objects"] != [] and seen["familiar"] is alone["familiar"] is not None
    assert f"CIDEr {cider['ensemble']} (beam5_lp2)" in page.caption(upload, model="ensemble")[2]
    view = page.explain(upload, model="ensemble")
    assert view[0] == ensemble.caption(photo).text
    assert view[3].startswith("Where the ensemble's EfficientNet-Lite0 member looked for")


def test_the_bundled_ensemble_is_a_folder_with_its_test_scores():
    """The menu's scores for the ensemble are its folder's metrics.json, as training.evaluate_ensemble wrote them
    beside its ensemble.json: the same weights, the bundled Lite0 and ResNet50 as members."""
    if not (BUNDLED_ENSEMBLE / "ensemble.json").is_file():
        pytest.skip("no weights/ensemble/ in this checkout")
    folder = read_ensemble_folder(BUNDLED_ENSEMBLE)
    assert [path.resolve() for path in folder.members] == [(ROOT / "weights").resolve(), (ROOT / "weights" / "resnet50").resolve()]
    assert "dev CIDEr" in folder.chosen_on and "0.6,0.4 best" in folder.chosen_on
    metrics = json.loads((BUNDLED_ENSEMBLE / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 1000
    assert isinstance(metrics["results"][metrics["best"]]["CIDEr"], float)
    assert metrics["ensemble"]["weights"] == pytest.approx(ensemble_weights(folder.weights, len(folder.members)))
    assert (BUNDLED_ENSEMBLE / "metrics.md").is_file()


def test_the_bundled_lite1_ensemble_is_a_folder_with_its_test_scores():
    """The Lite0 + Lite1 ensemble: the bundled Lite0 and weights/lite1/ (its encoder an int8 OpenVINO model, as
    Lite0's), equal weights chosen on dev, and its test scores from training.evaluate_ensemble."""
    if not (BUNDLED_LITE1_ENSEMBLE / "ensemble.json").is_file():
        pytest.skip("no weights/ensemble-lite1/ in this checkout")
    folder = read_ensemble_folder(BUNDLED_LITE1_ENSEMBLE)
    assert [path.resolve() for path in folder.members] == [(ROOT / "weights").resolve(), (ROOT / "weights" / "lite1").resolve()]
    assert "dev CIDEr" in folder.chosen_on and "0.5,0.5 best" in folder.chosen_on
    assert (ROOT / "weights" / "lite1" / "encoder.xml").is_file()
    metrics = json.loads((BUNDLED_LITE1_ENSEMBLE / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 1000
    assert metrics["ensemble"]["weights"] == pytest.approx(ensemble_weights(folder.weights, len(folder.members)))


NO_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = sys.modules["keras"] = None  # as if neither were installed
from captioner import Captioner
from webapp.models import ModelUnavailable, bundled_choices, page_models
lite0 = Captioner.from_pretrained(None)
models = page_models(lite0, bundled_choices(lite0))
print(" | ".join(label for label, _ in models.menu()))  # before anyone chose them
for name in ("resnet50", "ensemble", "resnet50", "ensemble-lite1"):
    try:
        models.get(name)
        print("loaded", name)
    except ModelUnavailable as exc:
        print(exc)
print(models.get("lite0")[1].caption("examples/dog.jpg").text)
print(models.get(None)[1].caption("examples/dog.jpg").text)
"""


def test_resnet50_without_tensorflow_says_what_to_install(tmp_path):
    """The bundled ResNet50 on a server without TensorFlow, nothing cached (its OpenVINO model, its converted
    ImageNet weights): marked in the menu from the start, the sentence when chosen, and the default, the Lite0 +
    Lite1 ensemble, and Lite0 alone (both encoders int8 OpenVINO models in their folders) still caption."""
    env = {**os.environ, "CAPTIONER_CACHE": str(tmp_path / "cache"), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "KERAS_HOME": str(tmp_path / "keras")}
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    menu, resnet50, ensemble, again, lite1, caption, lite1_caption = result.stdout.strip().splitlines()[-7:]
    # Known without trying (no TensorFlow, nothing cached): the menu marks them from the start.
    assert [label.endswith("(can't be loaded here)") for label in menu.split(" | ")] == [False, False, True, True]
    assert menu.startswith("Lite0 + Lite1 ensemble (default)")
    assert lite1 == "loaded ensemble-lite1" and lite1_caption.strip()
    assert resnet50 == again == f"ResNet50 can't be loaded on this server: its encoder needs TensorFlow, which isn't installed here. {RESNET50_FIX}"
    assert ensemble == f"The Lite0 + ResNet50 ensemble needs ResNet50. {resnet50}"
    assert len(ensemble) <= uploads.MAX_MESSAGE_CHARS  # shown whole
    assert caption.strip()
