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


def normalize_caption(text: str) -> list[str]:
    """Lowercase, strip punctuation and keep only alphabetic words.

    "A dog's ball, 2 times!" -> ["a", "dogs", "ball", "times"]
    """
    text = _NON_LETTERS.sub("", text.lower().replace("-", " "))
    return [word for word in text.split() if word.isalpha()]


class Vocabulary:
    """Maps words to ids and back. Ids 0..3 are the special tokens."""

    def __init__(self, words: Iterable[str]):
        words = [w for w in words if w not in SPECIAL_TOKENS]
        self.itos: list[str] = list(SPECIAL_TOKENS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

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
        Path(path).write_text(json.dumps({"itos": self.itos}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        itos = json.loads(Path(path).read_text())["itos"]
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: the first ids must be the special tokens {SPECIAL_TOKENS}")
        return cls(itos[len(SPECIAL_TOKENS) :])
