"""What the encoder sees, beside the caption: its ImageNet classes, how familiar the photo is, which words to name.

    ImageNetHead      the encoder's own ImageNet classifier (EfficientNet-Lite's `_fc`): pooled features ->
                      the 1,000 classes' probabilities, one (feature_dim x 1000) product. Caption.objects
    Familiarity       how far a photo is from the training photos, and how sure the model was of its caption:
                      one score, and the threshold under which the caption is flagged. Caption.familiar
    VisualWords       which caption words each class stands for ("borzoi" -> dog, "espresso" -> coffee), and the
                      words the vocabulary lacks ("pizza"), with their rows for the decoder; decoding.NameObjects
                      requires the words the classifier is sure of (DecodingOptions.name_objects)

The head comes from the encoder's ImageNet weights (training/convert_encoder.py, `--head-into`); the familiarity
summary and the word map are made from the training photos by training/visual.py. A weights folder without them
captions as before: no objects, no flag (None), nothing to name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The page, the API and the batch records show a photo's likeliest classes: at most this many, and only those
# the classifier gives at least this probability (its top class always).
TOP_OBJECTS = 3
MIN_OBJECT_PROBABILITY = 0.05
# A word new to the vocabulary starts from the output units of this many of its nearest old words.
OUTPUT_UNIT_NEIGHBOURS = 5


# What the bundled model knows, for the sentence that flags an unfamiliar photo (Flickr8k's world).
KNOWN_PHOTOS = "photos of people, dogs, children, sports and outdoor scenes"


def unfamiliar_note(objects: list[tuple[str, float]]) -> str:
    """The one sentence shown with a caption whose photo is unfamiliar: what the model knows, what the classifier
    sees instead."""
    seen = " and ".join(f"{article(name)}{name} ({probability:.0%})" for name, probability in objects[:2])
    return (f"This photo is unlike the {KNOWN_PHOTOS} the captioner learned from, so its caption is a guess"
            + (f": the image classifier sees {seen} instead." if seen else "."))


def article(name: str) -> str:
    """'an ' before a vowel, 'a ' before a consonant, none before a plural name ('binoculars', 'jeans')."""
    if name.endswith("s") and not name.endswith("ss"):
        return ""
    return "an " if name[:1].lower() in "aeiou" else "a "


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def new_output_units(kernel: np.ndarray, bias: np.ndarray, old_vectors: np.ndarray, new_vectors: np.ndarray):
    """(units, old) kernel and (old,) bias of the output layer, the old and new words' GloVe vectors -> the new words'
    (units, new) kernel columns and (new,) biases: each the mean of its OUTPUT_UNIT_NEIGHBOURS nearest old words'
    (cosine; DCC, Hendricks et al. 2016), special tokens and words without a vector left out; a new word without a
    vector gets the mean of all old words'. The old vectors are the model's own embedding (GloVe, frozen), so any
    model of the vocabulary grows the same words from its own output layer (an ensemble's members: ensemble.py)."""
    from .vocabulary import SPECIAL_TOKENS

    candidates = np.flatnonzero(np.linalg.norm(old_vectors, axis=1) > 0)
    candidates = candidates[candidates >= len(SPECIAL_TOKENS)]
    cosines = _unit_rows(new_vectors) @ _unit_rows(old_vectors[candidates]).T
    nearest = candidates[np.argsort(-cosines, axis=1, kind="stable")[:, :OUTPUT_UNIT_NEIGHBOURS]]
    columns, biases = kernel[:, nearest].mean(axis=2), bias[nearest].mean(axis=1)
    without_vector = np.linalg.norm(new_vectors, axis=1) == 0
    columns[:, without_vector] = kernel[:, len(SPECIAL_TOKENS):].mean(axis=1, keepdims=True)
    biases[without_vector] = bias[len(SPECIAL_TOKENS):].mean()
    return columns.astype(kernel.dtype), biases.astype(bias.dtype)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # zero rows stay zero


def readable_class_name(name: str) -> str:
    """The class list's names as people write them: 'great_white_shark' -> 'great white shark'."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class ImageNetHead:
    """The encoder's ImageNet classifier on its pooled features: softmax(features @ kernel + bias)."""

    kernel: np.ndarray  # (feature_dim, classes) float32
    bias: np.ndarray  # (classes,)
    class_names: tuple[str, ...]  # readable, in ImageNet-1k order (espresso is 967)

    def __post_init__(self):
        if self.kernel.shape[1:] != self.bias.shape or len(self.class_names) != len(self.bias):
            raise ValueError(f"the classifier's kernel {self.kernel.shape}, bias {self.bias.shape} and "
                             f"{len(self.class_names)} class names don't fit together")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, feature_dim) pooled features -> (n, classes) probabilities."""
        return softmax(np.asarray(features, np.float32) @ self.kernel + self.bias)

    def objects(self, probabilities: np.ndarray) -> list[tuple[str, float]]:
        """One image's class probabilities -> its likeliest classes as (readable name, probability), best first."""
        top = np.argsort(-probabilities, kind="stable")[:TOP_OBJECTS]
        return [(self.class_names[c], round(float(probabilities[c]), 4)) for i, c in enumerate(top)
                if i == 0 or probabilities[c] >= MIN_OBJECT_PROBABILITY]

    @classmethod
    def read(cls, path: Path) -> ImageNetHead:
        """An encoder_head.weights.h5 file (training.convert_encoder writes it): `kernel`, `bias`, `class_names`."""
        import h5py

        with h5py.File(path, "r") as file:
            names = tuple(readable_class_name(n.decode() if isinstance(n, bytes) else str(n)) for n in file["class_names"][()])
            return cls(np.asarray(file["kernel"][()], np.float32), np.asarray(file["bias"][()], np.float32), names)


@dataclass(frozen=True)
class Familiarity:
    """How familiar a photo is to the model, from three things that each separate right captions from wrong ones on
    the dev photos (training/visual.py measures them):

    - nearness: the mean cosine similarity of the photo's features to its NEIGHBOURS nearest training photos, in a
      compact summary of the training features (centred on their mean, projected on their first principal axes);
    - sureness: the caption's mean log-probability per token (<end> included);
    - confidence: how sure the ImageNet classifier is of a caption word for the photo (VisualWords.confidence: the
      probability of its surest word, its classes' summed: a dog of uncertain breed is still surely a dog); a photo
      it can name gets a caption that names it.

    Each is standardised by its mean and deviation on the Flickr8k dev photos, and the score is their weighted sum:
    0 is a typical dev photo. Below `threshold` (chosen on dev) the caption is flagged as unfamiliar.

    Whatever the score, a caption is also flagged when it names a thing the classifier reliably sees while it sees
    none of it here ("a brown and white dog" on a photo of an espresso): `contradicted`.
    """

    mean: np.ndarray  # (feature_dim,) the training features' mean
    axes: np.ndarray  # (feature_dim, dims) their first principal axes
    training: np.ndarray  # (training photos, dims) the training photos, centred, projected and scaled to unit length
    neighbours: int
    nearness_scale: tuple[float, float]  # (mean, deviation) on dev
    sureness_scale: tuple[float, float]
    confidence_scale: tuple[float, float]
    sureness_weight: float
    confidence_weight: float
    threshold: float
    # The word groups (indices into VisualWords.groups) the classifier reliably sees: of the training photos most of
    # whose captions name one, it gives under absent_probability to hardly any (training/visual.py). Empty (folders
    # made before the rule): nothing is contradicted.
    reliable_groups: tuple[int, ...] = ()
    absent_probability: float = 0.0

    def nearness(self, features: np.ndarray) -> np.ndarray:
        """(n, feature_dim) -> (n,) the mean cosine similarity to the nearest training photos."""
        projected = (np.asarray(features, np.float32) - self.mean) @ self.axes
        projected /= np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)
        similarities = projected @ self.training.T
        k = min(self.neighbours, similarities.shape[1])
        return np.partition(similarities, similarities.shape[1] - k, axis=1)[:, -k:].mean(axis=1)

    def scores(self, features: np.ndarray, mean_log_probs: np.ndarray, confidences: np.ndarray) -> np.ndarray:
        """(n, feature_dim) features, (n,) their captions' mean log-probability per token and (n,) the classifier's
        confidence (VisualWords.confidence) -> (n,) scores."""
        standardised = lambda values, scale: (np.asarray(values, np.float64) - scale[0]) / scale[1]  # noqa: E731
        return (standardised(self.nearness(features), self.nearness_scale)
                + self.sureness_weight * standardised(mean_log_probs, self.sureness_scale)
                + self.confidence_weight * standardised(confidences, self.confidence_scale))

    def contradicted(self, visual_words: VisualWords, group_probabilities: np.ndarray, captions: list) -> np.ndarray:
        """(n, groups) probabilities (VisualWords.group_probabilities) and n captions' token ids -> (n,) whether each
        names a reliably seen group that the classifier gives under absent_probability."""
        return np.array([any(group_probabilities[i, g] < self.absent_probability and not set(visual_words.groups[g]).isdisjoint(tokens)
                             for g in self.reliable_groups) for i, tokens in enumerate(captions)], bool)


@dataclass(frozen=True)
class VisualWords:
    """The caption words the ImageNet classes stand for, and the words they bring that the vocabulary lacks.

    Each class maps to at most one group of words, any of which names it ("dog", "dogs"); a word's probability in
    a photo is the sum of the probabilities of the classes that map to it. Words the vocabulary lacks ("pizza")
    get ids after the vocabulary's, an input row from their GloVe vector (as every word's: the embedding is
    GloVe, frozen) and an output unit transferred from their nearest words in the vocabulary (DCC, Hendricks et
    al. 2016): the model then puts them where it would put those words.
    """

    groups: tuple[tuple[int, ...], ...]  # each group's token ids (new words' ids follow the vocabulary's)
    class_group: np.ndarray  # (classes,) the group each class maps to, -1 for none
    new_words: tuple[str, ...]  # the words the vocabulary lacks, in id order
    new_embeddings: np.ndarray  # (new words, embedding_dim) their GloVe vectors
    new_output_kernel: np.ndarray  # (units, new words)
    new_output_bias: np.ndarray  # (new words,)
    required_probability: float  # a group is required when its words' probability is at least this (chosen on dev)
    max_required: int  # the most groups one caption must name

    def group_probabilities(self, class_probabilities: np.ndarray) -> np.ndarray:
        """(n, classes) -> (n, groups): each group's probability, the sum of its classes'."""
        mapped = self.class_group >= 0
        totals = np.zeros((len(class_probabilities), len(self.groups)))
        np.add.at(totals.T, self.class_group[mapped], class_probabilities[:, mapped].T)
        return totals

    def confidence(self, class_probabilities: np.ndarray) -> np.ndarray:
        """(n, classes) -> (n,) the probability of each photo's surest word group."""
        return self.group_probabilities(class_probabilities).max(axis=1)

    def required(self, class_probabilities: np.ndarray) -> list[tuple[tuple[int, ...], ...]]:
        """(n, classes) -> for each image, the word groups its caption must name (none, one or more), surest first."""
        totals = self.group_probabilities(class_probabilities)
        chosen = []
        for row in totals:
            sure = [g for g in np.argsort(-row, kind="stable")[: self.max_required] if row[g] >= self.required_probability]
            chosen.append(tuple(self.groups[g] for g in sure))
        return chosen


# ---- reading them from a weights folder ------------------------------------------------------------------


def read_familiarity_and_words(settings_path: Path, arrays_path: Path, vocabulary_words: list[str]) -> tuple[Familiarity, VisualWords]:
    """visual.json (the settings, the word map by words) and visual.weights.h5 (the arrays), as training/visual.py
    writes them; vocabulary_words: the vocabulary's tokens in id order, special tokens included (the new words' ids
    follow them)."""
    import h5py

    settings = json.loads(Path(settings_path).read_text())
    familiar, words = settings["familiarity"], settings["words"]
    ids = {word: i for i, word in enumerate([*vocabulary_words, *words["new_words"]])}
    with h5py.File(arrays_path, "r") as file:
        array = lambda name, dtype=np.float32: np.asarray(file[name][()], dtype)  # noqa: E731
        familiarity = Familiarity(array("familiarity/mean"), array("familiarity/axes"), array("familiarity/training"),
                                  int(familiar["neighbours"]), tuple(familiar["nearness_scale"]),
                                  tuple(familiar["sureness_scale"]), tuple(familiar["confidence_scale"]),
                                  float(familiar["sureness_weight"]), float(familiar["confidence_weight"]),
                                  float(familiar["threshold"]), tuple(int(g) for g in familiar.get("reliable_groups", ())),
                                  float(familiar.get("absent_probability", 0.0)))
        visual_words = VisualWords(tuple(tuple(ids[word] for word in group) for group in words["groups"]),
                                   np.asarray(words["class_group"], np.int64), tuple(words["new_words"]),
                                   array("words/new_embeddings"), array("words/new_output_kernel"),
                                   array("words/new_output_bias"), float(words["required_probability"]),
                                   int(words["max_required"]))
    return familiarity, visual_words
