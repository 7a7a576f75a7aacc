"""`Ensemble`: several trained captioners decoding together, each word chosen by all of them.

    ensemble = Ensemble.from_folder("weights/ensemble")      # the bundled one: its ensemble.json names the members
    ensemble.caption("examples/dog.jpg").text
    Ensemble.from_folders(["weights", "weights/resnet50"], weights=[0.5, 0.5])   # any members, any weights
    load_model("weights/ensemble")    # what --weights names: an ensemble's folder, or a model's (a Captioner)

Each member encodes the image with its own encoder and runs its own decoder; at every step their next-word
log-probabilities are averaged with the weights and renormalised (EnsembleStepModel: the members' StepModels run
as one), and the one decoding loop (decoding.DecodingTask) chooses from them, so every decoding option works as for
one model. The members must share one vocabulary: the averaged distributions are over the same words.

An ensemble's folder holds ensemble.json (ENSEMBLE_FILE): its members' weights folders, as paths relative to it, their
weights and how the weights were chosen; and, like a model's folder, the test scores training.evaluate writes
(metrics.json, metrics.md). `python -m training.evaluate_ensemble --split test --out DIR` writes all three.

    {"format_version": 1, "members": ["..", "../resnet50"], "weights": [0.6, 0.4],
     "chosen_on": "dev CIDEr of the app's default decoding: 0.5,0.5 0.540, 0.6,0.4 0.543, ..."}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .decoding import Caption, DecodingOptions, DecodingTask, Naming
from .encoder import ENCODER_NAMES, ENCODERS
from .explain import Explanation, caption_ids
from .image import fit_pixels, load_image, resize_for_encoder
from .inference import Captioner, display_photo
from .model import StepModel
from .visual import new_output_units
from .weights import METRICS_FILE, WeightsError, read_folder

ENSEMBLE_FILE = "ensemble.json"  # what makes a folder an ensemble's: its members, their weights, how they were chosen
ENSEMBLE_FORMAT_VERSION = 1


class EnsembleStepModel:
    """Several trained caption models run as one StepModel, which DecodingTask drives unchanged: every decoding
    method, prompt and filter works for an ensemble as for one model.

    Each member reads its own image features and carries its own LSTM state; the ensemble's image is the members'
    projected images side by side, and its state their states in member order. Its "logits" at a step are the
    weighted mean of the members' log-probabilities over the whole vocabulary, which the task renormalises over
    the tokens the vocabulary allows, as it does one model's logits. That is the weighted mean of the members'
    log-probabilities over the allowed tokens, renormalised: a member's log-probabilities over the allowed tokens
    differ from its log-softmax over all of them by one constant per row, which the renormalisation removes.
    """

    def __init__(self, members: Sequence[StepModel], weights: Sequence[float]):
        """weights: one per member, each at least 0, not all 0; scaled to sum to 1."""
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two models, not {len(members)}.")
        sizes = {member.output_kernel.shape[1] for member in members}
        if len(sizes) > 1:
            raise ValueError(f"An ensemble's models must share one vocabulary; these have {', '.join(map(str, sorted(sizes)))} tokens.")
        self.members = list(members)
        self.weights = ensemble_weights(weights, len(members))
        self.feature_dims = [member.image_kernel.shape[0] for member in members]
        self._feature_ends = np.cumsum(self.feature_dims)[:-1]
        self._image_ends = np.cumsum([member.units for member in members])[:-1]

    def with_new_words(self, embeddings: np.ndarray, output_kernels: Sequence[np.ndarray],
                       output_biases: Sequence[np.ndarray]) -> EnsembleStepModel:
        """StepModel.with_new_words for every member: the same new words' input vectors, each member's own output
        units for them (in member order). This ensemble is left as it is."""
        return EnsembleStepModel([member.with_new_words(embeddings, kernel, bias) for member, kernel, bias
                                  in zip(self.members, output_kernels, output_biases)], self.weights)

    def project_image(self, features: np.ndarray) -> np.ndarray:
        """(n, sum of the members' feature dims): each member's features side by side, in member order ->
        (n, sum of their units): each member's image branch side by side."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != sum(self.feature_dims):
            raise ValueError(f"Expected features of shape (n, {sum(self.feature_dims)}): the members' "
                             f"{' + '.join(map(str, self.feature_dims))} side by side, not {features.shape}.")
        parts = np.split(features, self._feature_ends, axis=1)
        return np.concatenate([member.project_image(part) for member, part in zip(self.members, parts)], axis=1)

    def initial_state(self, n: int) -> tuple:
        return tuple(member.initial_state(n) for member in self.members)

    @staticmethod
    def select_rows(state: tuple, rows) -> tuple:
        return tuple(StepModel.select_rows(member_state, rows) for member_state in state)

    def step(self, image: np.ndarray, tokens: np.ndarray, state: tuple):
        """StepModel.step for the ensemble: -> (the weighted mean of the members' log-probabilities, new state)."""
        combined, states = None, []
        for member, weight, member_image, member_state in zip(self.members, self.weights,
                                                              np.split(image, self._image_ends, axis=1), state):
            logits, member_state = member.step(member_image, tokens, member_state)
            states.append(member_state)
            logits -= logits.max(axis=-1, keepdims=True)
            logits -= np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            logits *= weight
            combined = logits if combined is None else combined + logits
        return combined, tuple(states)


def ensemble_weights(weights: Sequence[float], members: int) -> tuple[float, ...]:
    """An ensemble's weights, checked, scaled to sum to 1: one per member, each a number at least 0, not all 0."""
    weights = list(weights)
    if len(weights) != members:
        raise ValueError(f"An ensemble of {members} models needs {members} weights, one per model, not {len(weights)}.")
    if not all(isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in weights):
        raise ValueError(f"An ensemble's weights must be numbers of at least 0, not {weights!r}.")
    total = sum(weights)
    if total <= 0:
        raise ValueError("At least one of an ensemble's weights must be more than 0.")
    return tuple(float(w) / total for w in weights)


# ---- an ensemble's folder --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleFolder:
    """An ensemble's folder as its ensemble.json describes it (read_ensemble_folder checks it)."""

    path: Path
    members: tuple[Path, ...]  # the members' weights folders: ensemble.json's paths, joined to `path`
    weights: tuple[float, ...]  # as written (an Ensemble scales them to sum to 1)
    chosen_on: str  # how the weights were chosen, in words

    @property
    def metrics(self) -> dict | None:
        """The folder's test scores (metrics.json, as training.evaluate_ensemble writes them), if it has them."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise WeightsError(f"{path} is not valid JSON ({exc}); write it again with `python -m training.evaluate_ensemble "
                               f"--split test --out {self.path} ...`.") from None


def is_ensemble_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def read_ensemble_folder(path: str | os.PathLike) -> EnsembleFolder:
    """Read and check an ensemble's folder: its ensemble.json, and that each member's folder is there. WeightsError
    with a sentence saying what is wrong."""
    folder = Path(path)
    file = folder / ENSEMBLE_FILE
    if not file.is_file():
        raise WeightsError(f"{folder} is not an ensemble's folder: it has no {ENSEMBLE_FILE}. Write one with "
                           f"`python -m training.evaluate_ensemble --split test --out {folder} ...`.")
    try:
        content = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{file} can't be read as JSON ({exc}).") from None
    if not isinstance(content, dict):
        raise WeightsError(f"{file} must hold a JSON object with the ensemble's members and weights.")
    version = content.get("format_version", ENSEMBLE_FORMAT_VERSION)
    if not isinstance(version, int) or version > ENSEMBLE_FORMAT_VERSION:
        raise WeightsError(f"{file} was written by a newer version of this project; please update it.")
    members, weights = content.get("members"), content.get("weights")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise WeightsError(f"{file} must list at least two members' weights folders, as paths relative to {folder}, "
                           'like "members": ["..", "../resnet50"].')
    if not isinstance(weights, list) or len(weights) != len(members):
        given = f"{len(weights)} weights" if isinstance(weights, list) else "no list of weights"
        raise WeightsError(f"{file} gives {given} for its {len(members)} members: one weight per member, in the "
                           "members' order.")
    try:
        ensemble_weights(weights, len(members))
    except ValueError as exc:
        raise WeightsError(f"{file}: {exc}") from None
    chosen_on = content.get("chosen_on", "")
    if not isinstance(chosen_on, str):
        raise WeightsError(f"{file}'s chosen_on must be a sentence saying how the weights were chosen.")
    paths = tuple(Path(os.path.normpath(folder / member)) for member in members)
    for number, (member, member_path) in enumerate(zip(members, paths), start=1):
        if not member_path.is_dir():
            raise WeightsError(f"The ensemble in {folder} is missing member {number}: {file} names '{member}', and "
                               f"there is no folder {member_path}.")
    return EnsembleFolder(folder, paths, tuple(float(w) for w in weights), chosen_on)


def write_ensemble_file(folder: str | os.PathLike, members: Sequence[str | os.PathLike], weights: Sequence[float],
                        chosen_on: str) -> Path:
    """Write `folder`/ensemble.json: the members' weights folders relative to `folder` (so that the folders can move
    together), the weights as given, and how they were chosen. -> its path."""
    folder = Path(folder)
    weights = [float(w) for w in weights]
    ensemble_weights(weights, len(members))  # refused here, not when the folder is loaded
    folder.mkdir(parents=True, exist_ok=True)
    relative = [Path(os.path.relpath(Path(member).resolve(), folder.resolve())).as_posix() for member in members]
    content = {"format_version": ENSEMBLE_FORMAT_VERSION, "members": relative, "weights": weights, "chosen_on": chosen_on}
    path = folder / ENSEMBLE_FILE
    path.write_text(json.dumps(content, indent=1) + "\n")
    return path


def load_model(source: str | os.PathLike | None = None, revision: str | None = None) -> Captioner | Ensemble:
    """What --weights or --repo names: an ensemble's folder (one with ensemble.json) as an Ensemble, else what
    Captioner.from_pretrained takes (a weights folder, a Hub repo id, None: the default). The CLI, the batch job
    and the app load through this."""
    if source is not None and is_ensemble_folder(source):
        return Ensemble.from_folder(source)
    return Captioner.from_pretrained(source, revision)


# ---- the ensemble ---------------------------------------------------------------------------------------


class Ensemble:
    """Several Captioners captioning together; what a Captioner offers, for the ensemble: captions of images, of a
    decode worker's pixels (caption_pixels) and of features, word-by-word views (explain_pixels), warmup, facts.

    What the ensemble can't do itself is borrowed, and says so: the objects come from the first member with the
    ImageNet classifier; the word-by-word view (each word's probability and heatmap) is its heaviest member's, for
    the ensemble's caption (Grad-CAM follows one network's gradient: `explained_by` names the member).
    """

    def __init__(self, members: Sequence[Captioner], weights: Sequence[float] | None = None,
                 folder: EnsembleFolder | None = None):
        """weights: one per member, each at least 0, not all 0 (scaled to sum to 1); None: equal weights.
        folder: the ensemble's folder, when it was loaded from one (its scores are the ensemble's)."""
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two models, not {len(members)}.")
        for number, member in enumerate(members[1:], start=2):
            if member.vocab.itos != members[0].vocab.itos:
                raise ValueError(f"Model {number}'s vocabulary differs from model 1's ({vocabulary_difference(members[0], member)}): "
                                 "an ensemble's models must share one vocabulary, word for word.")
        self.members = members
        self.vocab = members[0].vocab
        self.folder = folder
        self.step_model = EnsembleStepModel([member.step_model for member in members],
                                            [1.0] * len(members) if weights is None else weights)
        self.weights = self.step_model.weights
        # Each member's step budget is its longest training caption; the ensemble may go as far as the longest.
        self.max_new_tokens = max(member.config.max_new_tokens for member in members)

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_folders(cls, sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> Ensemble:
        """Each source as Captioner.from_pretrained takes it: a weights folder or a Hub repo id."""
        return cls([Captioner.from_pretrained(source) for source in sources], weights)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, members: Mapping[str | os.PathLike, Captioner] | None = None) -> Ensemble:
        """An ensemble's folder (ensemble.json: read_ensemble_folder) -> the Ensemble, its members loaded.

        members: Captioners loaded already, by their weights folder's path: those members are shared, not loaded
        again (the app's Lite0 and ResNet50 serve alone and in the ensemble)."""
        folder = read_ensemble_folder(path)
        loaded = {Path(member_path).resolve(): captioner for member_path, captioner in (members or {}).items()}
        captioners = []
        for member_path in folder.members:
            shared = loaded.get(member_path.resolve())
            if shared is None:
                captioners.append(Captioner.from_folder(read_folder(member_path)))
                continue
            if shared.weights is not None and shared.weights.path.resolve() != member_path.resolve():
                raise ValueError(f"The model given for {member_path} was loaded from {shared.weights.path}.")
            captioners.append(shared)
        return cls(captioners, folder.weights, folder)

    # ---- captions ---------------------------------------------------------------------------------

    @property
    def input_size(self) -> tuple[int, int]:
        """The (width, height) of the pixels caption_pixels takes: the largest of the members' input sizes, so that
        each member's copy is made smaller from them, never larger (which would blur it)."""
        return max((member_input_size(member) for member in self.members), key=lambda size: size[0] * size[1])

    def encode(self, images) -> list[np.ndarray]:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> each member's (n, feature_dim) features, in member order:
        each member reads the image at its own input size, as it would alone."""
        images = list(images)
        return [member.encode(images) for member in self.members]

    def encode_pixels(self, pixels: np.ndarray) -> list[np.ndarray]:
        """(n, h, w, 3) uint8 pixels at `input_size` (a decode worker's) -> each member's features, in member order:
        a member with a smaller input size gets them resized (image.fit_pixels), as the decode workers resize."""
        return [member.encode_pixels(fit_pixels(pixels, member_input_size(member))) for member in self.members]

    def caption(self, image, options: DecodingOptions | None = None, **overrides) -> Caption:
        """One image -> its caption. overrides: DecodingOptions fields, e.g. caption(image, method="greedy")."""
        return self.caption_batch([image], options, **overrides)[0]

    def caption_batch(self, images, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        task = self.decoding_task(options, **overrides)  # refuse bad options before the encoders run
        return self._captions(task, self.encode(images))

    def caption_pixels(self, pixels: np.ndarray, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        """(n, h, w, 3) uint8 pixels at `input_size` (a decode worker's) -> their captions: one decode of each photo
        serves every member."""
        task = self.decoding_task(options, **overrides)
        return self._captions(task, self.encode_pixels(pixels))

    def caption_features(self, features: Sequence[np.ndarray], options: DecodingOptions | None = None,
                         **overrides) -> list[Caption]:
        """Caption precomputed features: one (n, feature_dim) array per member, in member order, rows the same images."""
        return self._captions(self.decoding_task(options, **overrides), features)

    def _captions(self, task: DecodingTask, features: Sequence[np.ndarray]) -> list[Caption]:
        if len(features) != len(self.members) or len({len(f) for f in features}) != 1:
            raise ValueError(f"Expected {len(self.members)} feature arrays, one per model, each with a row per image.")
        for number, (member, member_features) in enumerate(zip(self.members, features), start=1):
            if np.shape(member_features)[1:] != (member.config.feature_dim,):
                raise ValueError(f"Model {number} ({member.config.encoder}) reads {member.config.feature_dim:,} features per image, "
                                 f"not {np.shape(member_features)[1:]}: give each model's features in model order.")
        side_by_side = np.concatenate([np.asarray(f, np.float32) for f in features], axis=1)
        seer = self.members[self.seer] if self.seer is not None else None
        seer_features = features[self.seer] if seer is not None else None
        probabilities = seer._class_probabilities(seer_features) if seer is not None else None
        found = task.run(side_by_side, class_probabilities=probabilities)
        if seer is None:
            return [Caption.from_hypotheses(task.words, hypotheses) for hypotheses in found]
        # What the encoder sees, and how familiar the photo is, are the first classifier's among the members: its
        # objects, and its flag for the ensemble's caption (the bundled flag reads the features and the
        # classifier, not the caption: visual.json's sureness_weight is 0).
        described = seer._described(seer_features, probabilities, [h[0] for h in found])
        return [Caption.from_hypotheses(task.words, hypotheses, **extra) for hypotheses, extra in zip(found, described)]

    @cached_property
    def seer(self) -> int | None:
        """The index of the first member with the ImageNet classifier (whose objects the captions carry); None: none has."""
        return next((i for i, member in enumerate(self.members) if member.head is not None), None)

    @cached_property
    def naming(self) -> Naming | None:
        """What DecodingOptions.name_objects needs, for the ensemble: the classifier's member's word map, and every
        member grown by its new words, each with output units transferred from its own output layer (the members'
        embeddings are the same GloVe vectors, so the same neighbours). None: that member has no word map."""
        if self.seer is None or self.members[self.seer].naming is None:
            return None
        visual_words = self.members[self.seer].naming.visual_words
        units = [new_output_units(m.step_model.output_kernel, m.step_model.output_bias, m.step_model.embeddings,
                                  visual_words.new_embeddings) for m in self.members]
        grown = self.step_model.with_new_words(visual_words.new_embeddings, [k for k, _ in units], [b for _, b in units])
        return Naming(visual_words, self.members[self.seer].naming.vocab, grown)

    def decoding_task(self, options: DecodingOptions | None = None, **overrides) -> DecodingTask:
        """As Captioner.decoding_task: `options` with `overrides`, resolved for the ensemble."""
        options = dataclasses.replace(options or DecodingOptions(), **overrides)
        return DecodingTask(self.step_model, self.vocab, options, self.max_new_tokens,
                            self.naming if options.name_objects else None)

    def decoding_options(self, options: DecodingOptions | None = None, **overrides) -> DecodingOptions:
        """`options` with `overrides`, checked against the ensemble's vocabulary (see decoding_task)."""
        return self.decoding_task(options, **overrides).options

    # ---- word by word ---------------------------------------------------------------------------------

    @property
    def explainer(self) -> Captioner:
        """The member whose word-by-word view explains the ensemble's captions: the heaviest (the first of equals)."""
        return self.members[self._explainer_index]

    @property
    def _explainer_index(self) -> int:
        return int(np.argmax(self.weights))

    @property
    def explained_by(self) -> str:
        """Whose heatmaps an explanation shows, for people: "the ensemble's ResNet50 member"."""
        encoder = self.explainer.config.encoder
        return f"the ensemble's {ENCODER_NAMES.get(encoder, encoder)} member"

    def explain(self, image, options: DecodingOptions | None = None, **overrides) -> Explanation:
        """The ensemble's caption of an image (PIL, path, bytes or array), word by word as `explainer` sees it."""
        options = self.decoding_options(options, **overrides)  # refused before the image is read
        photo = load_image(image, target_size=self.input_size)
        return self.explain_pixels(resize_for_encoder(photo, self.input_size), photo, options)

    def explain_pixels(self, pixels: np.ndarray, display: Image.Image | np.ndarray | None = None,
                       options: DecodingOptions | None = None, **overrides) -> Explanation:
        """The ensemble's caption of one image's (h, w, 3) uint8 pixels at `input_size`, with its candidates and
        objects, word by word as its heaviest member (`explainer`) sees that caption: each word's probability and
        heatmap are that member's. display: the photo to draw the heatmaps on (None: the pixels)."""
        task = self.decoding_task(options, **overrides)
        pixels, explainer = np.asarray(pixels), self._explainer_index
        # One encoder pass per member; the explainer's also gives the feature map, for the heatmaps.
        encoded = [member.encode_pixels(fit_pixels(pixels[None], member_input_size(member)), feature_maps=i == explainer)
                   for i, member in enumerate(self.members)]
        features, maps = [*encoded[:explainer], encoded[explainer][0], *encoded[explainer + 1 :]], encoded[explainer][1]
        (caption,) = self._captions(task, features)
        # The caption is given: only the member's word probabilities and heatmaps are asked of it. (name_objects: the
        # caption may hold a word the classifier's member added, which the explainer reads grown.)
        member = self.members[explainer]
        member_task = member.decoding_task(DecodingOptions("greedy", name_objects=True))
        explanation = member.explain_encoded(member_task, features[explainer], maps, display_photo(pixels, display),
                                             caption_ids(member_task.words, caption.text))
        return dataclasses.replace(explanation, caption=caption)

    # ---- serving ---------------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Run each member's encoder once (each is traced on first use), so the first user doesn't wait for them."""
        for member in self.members:
            member.warmup()

    @property
    def description(self) -> dict:
        """Facts about the ensemble, for an info line (Captioner.description's keys): the members' encoders with
        their weights, where their weights come from, the ensemble folder's test scores; and each member's facts."""
        sources = [member.weights.source if member.weights is not None else "unknown source" for member in self.members]
        return {
            "encoder": " + ".join(f"{member.config.encoder} ({weight:g})" for member, weight in zip(self.members, self.weights)),
            "decoder": " + ".join(member.description["decoder"] for member in self.members),
            "vocab_size": len(self.vocab),
            "source": " + ".join(sources),
            "revision": None,
            "metrics": self.folder.metrics if self.folder is not None else None,
            "chosen_on": self.folder.chosen_on if self.folder is not None else None,
            "members": [member.description | {"weight": weight} for member, weight in zip(self.members, self.weights)],
        }


def member_input_size(member: Captioner) -> tuple[int, int]:
    """A member's encoder's (width, height), without building the encoder."""
    return tuple(ENCODERS[member.config.encoder].input_size)


def vocabulary_difference(first: Captioner, other: Captioner) -> str:
    """Where two vocabularies part, in words."""
    a, b = first.vocab.itos, other.vocab.itos
    if len(a) != len(b):
        return f"{len(b):,} tokens against {len(a):,}"
    index = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"token {index} is '{b[index]}' there, '{a[index]}' in model 1"
