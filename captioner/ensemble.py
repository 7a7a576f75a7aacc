"""`Ensemble`: several trained captioners decoding together, each word chosen by all of them.

    ensemble = Ensemble.from_folders(["weights", "weights/resnet50"], weights=[0.5, 0.5])
    ensemble.caption("examples/dog.jpg").text

Each member encodes the image with its own encoder and runs its own decoder; at every step their next-word
log-probabilities are averaged with the weights and renormalised (EnsembleStepModel: the members' StepModels run
as one), and the one decoding loop (decoding.DecodingTask) chooses from them, so every decoding option works as for
one model. The members must share one vocabulary: the averaged distributions are over the same words.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from .decoding import Caption, DecodingOptions, DecodingTask
from .inference import Captioner
from .model import StepModel


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


class Ensemble:
    def __init__(self, members: Sequence[Captioner], weights: Sequence[float] | None = None):
        """weights: one per member, each at least 0, not all 0 (scaled to sum to 1); None: equal weights."""
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two models, not {len(members)}.")
        for number, member in enumerate(members[1:], start=2):
            if member.vocab.itos != members[0].vocab.itos:
                raise ValueError(f"Model {number}'s vocabulary differs from model 1's ({vocabulary_difference(members[0], member)}): "
                                 "an ensemble's models must share one vocabulary, word for word.")
        self.members = members
        self.vocab = members[0].vocab
        self.step_model = EnsembleStepModel([member.step_model for member in members],
                                            [1.0] * len(members) if weights is None else weights)
        self.weights = self.step_model.weights
        # Each member's step budget is its longest training caption; the ensemble may go as far as the longest.
        self.max_new_tokens = max(member.config.max_new_tokens for member in members)

    @classmethod
    def from_folders(cls, sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> Ensemble:
        """Each source as Captioner.from_pretrained takes it: a weights folder or a Hub repo id."""
        return cls([Captioner.from_pretrained(source) for source in sources], weights)

    def encode(self, images) -> list[np.ndarray]:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> each member's (n, feature_dim) features, in member order."""
        images = list(images)
        return [member.encode(images) for member in self.members]

    def caption(self, image, options: DecodingOptions | None = None, **overrides) -> Caption:
        """One image -> its caption. overrides: DecodingOptions fields, e.g. caption(image, method="greedy")."""
        return self.caption_batch([image], options, **overrides)[0]

    def caption_batch(self, images, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        task = self.decoding_task(options, **overrides)  # refuse bad options before the encoders run
        return self._captions(task, self.encode(images))

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
        return [Caption.from_hypotheses(self.vocab, hypotheses) for hypotheses in task.run(side_by_side)]

    def decoding_task(self, options: DecodingOptions | None = None, **overrides) -> DecodingTask:
        """As Captioner.decoding_task: `options` with `overrides`, resolved for the ensemble."""
        options = dataclasses.replace(options or DecodingOptions(), **overrides)
        return DecodingTask(self.step_model, self.vocab, options, self.max_new_tokens)

    @property
    def description(self) -> dict:
        """Facts about the ensemble, for an info line: each member's, with its weight."""
        return {"ensemble": [member.description | {"weight": weight} for member, weight in zip(self.members, self.weights)]}


def vocabulary_difference(first: Captioner, other: Captioner) -> str:
    """Where two vocabularies part, in words."""
    a, b = first.vocab.itos, other.vocab.itos
    if len(a) != len(b):
        return f"{len(b):,} tokens against {len(a):,}"
    index = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"token {index} is '{b[index]}' there, '{a[index]}' in model 1"
