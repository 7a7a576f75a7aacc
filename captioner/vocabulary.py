"""Caption text: normalisation and the word <-> id vocabulary.

`normalize_caption` is the one text path: training builds the vocabulary from
its output and the app's vocabulary maps the same tokens, so what the model was
trained on and what it is asked about never drift apart.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0..3; PAD must be 0 for mask_zero

_NON_LETTERS = re.compile(r"[^a-z\s]")

# A caption may not end on a word that ends fewer than this share of the training captions it appears in ("a",
# "the", "on", "red" end under 1%; "grass" 25%): self-critical training and the length penalty otherwise let a
# caption stop mid-phrase ("a little girl is sitting on a bench in a"). Words seen in fewer than
# MIN_CAPTIONS_FOR_ENDINGS training captions are left free: too few to tell.
MIN_FINAL_SHARE = 0.01
MIN_CAPTIONS_FOR_ENDINGS = 20
# The words that only tie a caption together: the word-by-word view starts at the first other word ("dog" in "a dog
# runs on the grass"), and they alone may appear twice in a generated caption (decoding.NoRepeatedWords).
FUNCTION_WORDS = frozenset(
    "a an the is are was were be of in on at to with and or for from by into onto over under near its his her their "
    "while as up down out".split()
)


def normalize_caption(text: str) -> list[str]:
    """Lowercase, strip punctuation and keep only alphabetic words.

    "A dog's ball, 2 times!" -> ["a", "dogs", "ball", "times"]
    """
    text = _NON_LETTERS.sub("", text.lower().replace("-", " "))
    return [word for word in text.split() if word.isalpha()]


class Vocabulary:
    """Maps words to ids and back. Ids 0..3 are the special tokens.

    never_final: the words a generated caption may not end on (`never_final_words`; vocab.json's "never_final",
    empty for folders written before it): decoding forbids <end> right after them (decoding.NoCutOffEnding)."""

    def __init__(self, words: Iterable[str], never_final: Iterable[str] = ()):
        words = [w for w in words if w not in SPECIAL_TOKENS]
        self.itos: list[str] = list(SPECIAL_TOKENS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")
        self.never_final: frozenset[str] = frozenset(w for w in never_final if w in self.stoi)

    pad_id = property(lambda self: self.stoi[PAD])
    start_id = property(lambda self: self.stoi[START])
    end_id = property(lambda self: self.stoi[END])
    unk_id = property(lambda self: self.stoi[UNK])

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def forbidden_ids(self) -> list[int]:
        """Tokens a generated caption may never contain (END only ends it)."""
        return [self.pad_id, self.start_id, self.unk_id]

    def allowed_tokens(self, first: bool = False) -> np.ndarray:
        """(vocab,) bool, read-only: the tokens a generated caption may contain at a position (`first`: its first).

        Never padding, start or unknown, and <end> never first, so that no caption is empty. The one rule:
        decoding's probabilities, explain's and self-critical training's are the model's renormalised over these.
        """
        return self._allowed_tokens[first]

    @cached_property
    def _allowed_tokens(self) -> dict[bool, np.ndarray]:
        later = np.ones(len(self), bool)
        later[self.forbidden_ids] = False
        first = later.copy()
        first[self.end_id] = False
        for mask in (first, later):
            mask.flags.writeable = False
        return {True: first, False: later}

    @cached_property
    def never_final_ids(self) -> np.ndarray:
        """(vocab,) bool, read-only: True for the words a caption may not end on."""
        mask = np.zeros(len(self), bool)
        mask[[self.stoi[w] for w in self.never_final]] = True
        mask.flags.writeable = False
        return mask

    @cached_property
    def once_only_ids(self) -> np.ndarray:
        """(vocab,) bool, read-only: True for the words that aren't function words (nor special tokens)."""
        mask = np.array([word not in FUNCTION_WORDS and word not in SPECIAL_TOKENS for word in self.itos])
        mask.flags.writeable = False
        return mask

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 10) -> "Vocabulary":
        """Words seen more than `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for caption in captions for w in normalize_caption(caption))
        kept = sorted((w for w, n in counts.items() if n > min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in normalize_caption(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at END and leaving out special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= len(SPECIAL_TOKENS):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        content = {"itos": self.itos} | ({"never_final": sorted(self.never_final)} if self.never_final else {})
        Path(path).write_text(json.dumps(content, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        content = json.loads(Path(path).read_text())
        itos = content["itos"]
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: the first ids must be the special tokens {SPECIAL_TOKENS}")
        return cls(itos[len(SPECIAL_TOKENS) :], content.get("never_final", ()))


def never_final_words(captions: Iterable[str], words: Iterable[str]) -> list[str]:
    """Of `words`, those that end fewer than MIN_FINAL_SHARE of the captions they appear in, among the words seen
    in at least MIN_CAPTIONS_FOR_ENDINGS captions (training's: prepare.py)."""
    seen, final = Counter(), Counter()
    for caption in captions:
        tokens = normalize_caption(caption)
        if tokens:
            seen.update(set(tokens))
            final[tokens[-1]] += 1
    return sorted(w for w in words if seen[w] >= MIN_CAPTIONS_FOR_ENDINGS and final[w] < MIN_FINAL_SHARE * seen[w])
