"""The models the page offers, each loaded on first use: `ModelChoices`, which the page's handlers ask for a model
by the name a request gives (webapp/handlers.py).

    models = ModelChoices(captioner, bundled_choices(captioner))   # the default, loaded and warmed up already
    choice, model = models.get("resnet50")    # loads (and warms up) ResNet50 the first time, once
    choice, model = models.get(None)          # the default
    models.menu()                             # the dropdown's (label, name) pairs, the default first

The bundled choices: the default (what the app loaded: the bundled EfficientNet-Lite0 unless told otherwise), the
bundled ResNet50 (weights/resnet50/, the reference recipe) and the ensemble of the two (captioner.Ensemble, shown to
the handlers as a Captioner by `EnsembleModel`). A model that can't be loaded here (ResNet50 without TensorFlow, or
without its ImageNet weights and no internet) is answered with a sentence that says what to install or run, and the
other models keep working.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from captioner import Captioner, DecodingOptions, Ensemble, WeightsError
from captioner.backends import KerasMissing
from captioner.decoding import Caption
from captioner.explain import Explanation
from captioner.image import resize_for_encoder
from captioner.weights import BUNDLED_WEIGHTS, METRICS_FILE, read_folder

from .uploads import RequestError, for_log

log = logging.getLogger("app")

# The names requests choose the models by (the API's `model` values, the dropdown's values).
DEFAULT = "default"  # what the app loaded at start: the bundled EfficientNet-Lite0 unless --weights/--repo say otherwise
RESNET50 = "resnet50"
ENSEMBLE = "ensemble"

BUNDLED_RESNET50 = BUNDLED_WEIGHTS / "resnet50"
# Lite0's and ResNet50's weights in the ensemble: the best of five weightings on the dev split (README, "Ensembles").
ENSEMBLE_WEIGHTS = (0.6, 0.4)
# The ensemble's test scores as `python -m training.evaluate_ensemble --split test --weightings 0.6,0.4` wrote them
# (artifacts/ensemble-lite0-resnet50/metrics.json: artifacts/ is training's work folder, which no checkout carries).
ENSEMBLE_METRICS = {"split": "test", "best": "beam5_lp2",
                    "results": {"beam5_lp2": {"BLEU-4": 0.2224051300243199, "CIDEr": 0.579806185039988}}}
ENCODER_NAMES = {"efficientnet_lite0": "EfficientNet-Lite0", "resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2",
                 "inception_v3": "InceptionV3", "xception": "Xception", "densenet201": "DenseNet201"}

# What a user is told to do when ResNet50 can't be loaded (a failure's sentence is at most uploads.MAX_MESSAGE_CHARS).
RESNET50_FIX = (
    "To offer it: `pip install -r training/requirements.txt` (TensorFlow) and `python -m training.convert_encoder "
    "--encoder resnet50` (its ImageNet weights, which Keras would otherwise download), then restart the app."
)
LITE0_ABOUT = (
    "The bundled model: an EfficientNet-Lite0 encoder (int8, OpenVINO) with an LSTM decoder, self-critical trained. "
    "It shows what its image classifier sees, can name it in the caption and flags unfamiliar photos."
)
RESNET50_ABOUT = (
    "The reference recipe: a ResNet50 encoder with the same LSTM decoder, self-critical trained. It has no image "
    "classifier, so it shows no objects, doesn't name them and can't flag unfamiliar photos."
)
ENSEMBLE_ABOUT = (
    "EfficientNet-Lite0 and ResNet50 choosing each word together (weights {weights}): the best scores, and both "
    "encoders run, so each caption takes longer. What the image classifier sees is Lite0's; the caption doesn't name "
    "it and unfamiliar photos aren't flagged. Word by word, the page shows Lite0's view of the ensemble's caption."
)


class ModelUnavailable(RequestError):
    """A model that can't be loaded on this server; the message says why and what to install or run."""

    def __init__(self, message: str, label: str):
        super().__init__(message)
        self.label = label


class ModelChoice:
    """One model the page offers: its name (the API's value), its label (the dropdown's), how to load it, its test
    scores (shown before it is loaded), a line about what it is, and what to do when it can't be loaded here.

    `model()` loads it on first use, warms it up and keeps it; two requests that choose it at once load it once (the
    second waits for the first). A load that fails is remembered with the sentence that says why, until a restart:
    what fixes it (installing TensorFlow, converting weights) needs one, and a failing load can take seconds.
    """

    def __init__(self, name: str, label: str, load: Callable[[], object], metrics: dict | None = None,
                 about: str = "", fix: str = ""):
        self.name, self.label, self.load = name, label, load
        self.metrics, self.about, self.fix = metrics, about, fix
        self._lock = threading.Lock()
        self._model = None
        self._failure: str | None = None

    @classmethod
    def loaded(cls, name: str, label: str, model, about: str = "") -> ModelChoice:
        """A choice whose model is loaded (and warmed up) already: the app's default."""
        choice = cls(name, label, lambda: model, model.description.get("metrics"), about)
        choice._model = model
        return choice

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def failure(self) -> str | None:
        """Why it can't be loaded here (a sentence), once a load has failed; None otherwise."""
        return self._failure

    def model(self):
        """The model, loaded and warmed up on first use; ModelUnavailable with the sentence if it can't be."""
        if self._model is None and self._failure is None:
            with self._lock:
                if self._model is None and self._failure is None:  # (another request may have loaded it meanwhile)
                    self._model, self._failure = self._load()
        if self._failure is not None:
            raise ModelUnavailable(self._failure, self.label)
        return self._model

    def _load(self) -> tuple[object | None, str | None]:
        start = time.perf_counter()
        try:
            model = self.load()
            model.warmup()  # the encoder is built (and traced) here: the first caption doesn't wait for it
        except ModelUnavailable as member:  # an ensemble's member that can't be loaded
            return None, f"The {self.label} needs {member.label}. {member}"
        except Exception as exc:
            log.exception("The %s model can't be loaded", self.label)
            return None, f"{self.label} can't be loaded on this server: {why_not_loaded(exc)}. {self.fix}".strip()
        log.info("Loaded the %s model in %.1f s", self.label, time.perf_counter() - start)
        return model, None

    def menu_label(self) -> str:
        """The dropdown's label: the name, its test CIDEr, and a mark once it has failed to load."""
        scores = best_cider(self.metrics)
        label = self.label + (f" \u00b7 test CIDEr {scores:.3f}" if scores is not None else "")
        return label + (" (can't be loaded here)" if self._failure else "")

    def status(self) -> str:
        """What a user choosing it should know: what it is, and why it can't be loaded here once it has failed to."""
        about = f"**{self.label}**: {self.about}" if self.about else f"**{self.label}**"
        return f"{about} {self._failure}" if self._failure else about


def why_not_loaded(exc: BaseException) -> str:
    """Why a model couldn't be loaded, for users: what's missing, without the server's paths."""
    if isinstance(exc, KerasMissing):
        return "its encoder needs TensorFlow, which isn't installed here"
    if isinstance(exc, ImportError):
        return f"the Python package {exc.name or 'it needs'} isn't installed here"
    if isinstance(exc, WeightsError):
        return "its weights are missing or damaged (the server's log says which file)"
    return "loading it failed (the server's log says why)"


def best_cider(metrics: dict | None) -> float | None:
    """metrics.json's CIDEr with its best decoding, if it has one."""
    scores = ((metrics or {}).get("results") or {}).get((metrics or {}).get("best")) or {}
    cider = scores.get("CIDEr")
    return float(cider) if isinstance(cider, (int, float)) else None


class ModelChoices:
    """The models the page offers, by name, the default first; the others load on first use (ModelChoice)."""

    def __init__(self, default: Captioner, others: Sequence[ModelChoice] = (), label: str | None = None,
                 about: str | None = None):
        """default: the model the app loaded at start, warmed up; others: the other choices."""
        self.default = ModelChoice.loaded(DEFAULT, label or default_label(default), default,
                                          default_about(default) if about is None else about)
        self.choices = {choice.name: choice for choice in [self.default, *others]}

    def __len__(self) -> int:
        return len(self.choices)

    def choice(self, name) -> ModelChoice:
        """A request's model name -> its choice (None or "": the default); a name not offered gets a sentence
        listing the choices."""
        if name is None or (isinstance(name, str) and not name.strip()):
            return self.default
        choice = self.choices.get(name.strip().lower()) if isinstance(name, str) else None
        if choice is None:
            offered = ", ".join(f"'{c.name}' ({c.label})" for c in self.choices.values())
            raise RequestError(f"There is no model {for_log(repr(name), 40)} here; choose one of {offered}.")
        return choice

    def get(self, name) -> tuple[ModelChoice, object]:
        """-> (the choice, its model, loaded on first use); RequestError or ModelUnavailable with a sentence."""
        choice = self.choice(name)
        return choice, choice.model()

    def menu(self) -> list[tuple[str, str]]:
        """(label, name) for the dropdown, the default first."""
        return [(choice.menu_label(), choice.name) for choice in self.choices.values()]


def default_label(model) -> str:
    """The default's label: its encoder's name, and that it is the default."""
    encoder = model.description.get("encoder", "")
    return f"{ENCODER_NAMES.get(encoder, encoder)} (default)"


def default_about(captioner: Captioner) -> str:
    """The line about the default: the bundled model's, or where this server's own model comes from."""
    if is_bundled(captioner):
        return LITE0_ABOUT
    return f"The model this server started with (weights from {captioner.description.get('source') or 'unknown source'})."


def is_bundled(captioner: Captioner) -> bool:
    """Whether the captioner's weights are the bundled folder's (the ensemble then shares it as its Lite0 member)."""
    folder = captioner.weights.path if captioner.weights is not None else None
    return folder is not None and Path(folder).resolve() == BUNDLED_WEIGHTS.resolve()


def read_metrics(folder: Path) -> dict | None:
    """A weights folder's metrics.json (its test scores), read without loading the model."""
    try:
        return json.loads((folder / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def bundled_choices(default: Captioner) -> list[ModelChoice]:
    """The bundled models beside the default: ResNet50 and the ensemble of Lite0 and ResNet50, where the checkout
    has weights/resnet50/ (a trimmed copy may not)."""
    if not (BUNDLED_RESNET50 / "config.json").is_file():
        return []
    resnet50 = ModelChoice(
        RESNET50, "ResNet50",
        lambda: Captioner.from_folder(read_folder(BUNDLED_RESNET50, source="bundled weights/resnet50/")),
        read_metrics(BUNDLED_RESNET50), RESNET50_ABOUT, RESNET50_FIX,
    )

    def ensemble() -> EnsembleModel:
        # The default is the bundled Lite0 unless the app was told otherwise: then it shares it, else loads its own.
        lite0 = default if is_bundled(default) else Captioner.from_folder(read_folder(BUNDLED_WEIGHTS, source="bundled weights/"))
        return EnsembleModel(Ensemble([lite0, resnet50.model()], ENSEMBLE_WEIGHTS), ENSEMBLE_METRICS)

    weights = " / ".join(f"{w:g}" for w in ENSEMBLE_WEIGHTS)
    return [resnet50, ModelChoice(ENSEMBLE, "Lite0 + ResNet50 ensemble", ensemble, ENSEMBLE_METRICS,
                                  ENSEMBLE_ABOUT.format(weights=weights), RESNET50_FIX)]


# ---- an ensemble, as the handlers use a Captioner -----------------------------------------------------------


class EnsembleModel:
    """A captioner.Ensemble with what the page's handlers use of a Captioner: captions of a decode worker's pixels
    (one decode: each member's encoder gets them at its own input size), a batch's, explanations, warmup, facts.

    What the ensemble can't do itself is borrowed, and says so: the objects come from the first member with the
    ImageNet classifier; the word-by-word view (each word's probability and heatmap) is its heaviest member's, for
    the ensemble's caption (Grad-CAM follows one network's gradient); unfamiliar photos aren't flagged (familiar:
    None), since the flag's threshold was set on one model's own captions.
    """

    def __init__(self, ensemble: Ensemble, metrics: dict | None = None):
        self.ensemble = ensemble
        self.members: list[Captioner] = ensemble.members
        self.metrics = metrics
        self.input_size = self.members[0].encoder.input_size  # what the decode worker makes; the others are resized
        self.seer = next((i for i, member in enumerate(self.members) if member.head is not None), None)
        self.explainer = self.members[int(np.argmax(ensemble.weights))]
        self.explained_by = f"the ensemble's {ENCODER_NAMES.get(self.explainer.config.encoder, self.explainer.config.encoder)} member"

    def decoding_options(self, options: DecodingOptions | None = None, **overrides) -> DecodingOptions:
        return self.ensemble.decoding_task(options, **overrides).options

    def caption_pixels(self, pixels: np.ndarray, options: DecodingOptions | None = None) -> list[Caption]:
        """(n, h, w, 3) uint8 pixels at `input_size` -> their captions, with what the classifier sees."""
        options = self.decoding_options(options)  # bad options are refused before the encoders run
        features = [member.encode_pixels(fit_pixels(pixels, member.encoder.input_size)) for member in self.members]
        captions = self.ensemble.caption_features(features, options)
        if self.seer is None:
            return captions
        head = self.members[self.seer].head
        return [dataclasses.replace(caption, objects=head.objects(row))
                for caption, row in zip(captions, head.probabilities(features[self.seer]))]

    def caption_batch(self, images, options: DecodingOptions | None = None) -> list[Caption]:
        """Images (the decode workers' pixels, or what Captioner.prepare_pixels takes) -> their captions."""
        options = self.decoding_options(options)
        return self.caption_pixels(self.members[0].prepare_pixels(images), options)

    def explain_pixels(self, pixels: np.ndarray, display=None, options: DecodingOptions | None = None) -> Explanation:
        """The ensemble's caption of one image's pixels, word by word as its heaviest member sees that caption."""
        (caption,) = self.caption_pixels(np.asarray(pixels)[None], options)
        member_pixels = fit_pixels(np.asarray(pixels)[None], self.explainer.encoder.input_size)[0]
        # The caption is given: only the member's word probabilities and heatmaps are asked of it.
        explanation = self.explainer.explain_pixels(member_pixels, display, caption=caption.text,
                                                    options=DecodingOptions("greedy", name_objects=False))
        return dataclasses.replace(explanation, caption=caption)

    def warmup(self) -> None:
        for member in self.members:
            member.warmup()

    @property
    def description(self) -> dict:
        """The facts line's: the members' encoders with their weights, where their weights come from, the scores."""
        members = [(member.config.encoder, weight, member.weights.source if member.weights else "unknown source")
                   for member, weight in zip(self.members, self.ensemble.weights)]
        return {"encoder": " + ".join(f"{encoder} ({weight:g})" for encoder, weight, _ in members),
                "vocab_size": len(self.ensemble.vocab), "source": " + ".join(source for _, _, source in members),
                "revision": None, "metrics": self.metrics}


def fit_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w, 3) uint8 pixels -> the same images at `size` (width, height), as the decode worker resizes."""
    pixels = np.asarray(pixels)
    if (pixels.shape[2], pixels.shape[1]) == tuple(size):
        return pixels
    return np.stack([resize_for_encoder(Image.fromarray(image), tuple(size)) for image in pixels])
