"""CIDEr-D, vectorised: the self-critical step's reward.

The same score as the coco-caption toolkit's `pycocoevalcap.cider.Cider` (which
is CIDEr-D: tf-idf n-gram vectors for n = 1..4, the candidate's counts clipped
to the reference's, a Gaussian length penalty with sigma 6, times 10), computed
for tens of thousands of captions at once with NumPy instead of one Python dict
per sentence. `tests/test_scst.py` checks that the two agree.

Document frequencies come from the references the scorer is built on: for the
reward, every training image's references, so a sampled caption is rewarded for
the n-grams that distinguish its image among all training images. (pycocoevalcap
computes them over the references it is given, so built on the same references
the two give the same scores.)

Sentences are whitespace-separated words, as pycocoevalcap takes them after its
tokenizer; training gives it `normalize_caption`'s words, the tokens the model
writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_N = 4  # n-grams of 1..4 words, as CIDEr defines them
SIGMA = 6.0  # the length penalty's standard deviation, in words (CIDEr-D)
# An n-gram is one int64 key: each word id + 1 is a digit in base `words + 1`, so 4-grams fit while the table
# holds fewer than 2 ** 15 words (Flickr8k's captions use about 9,000).
MAX_WORDS = 2**15 - 1


class CiderD:
    """CIDEr-D against a fixed set of references, with document frequencies from those references.

    references: per image, its reference sentences. words: an initial word table, e.g. the vocabulary's
    `itos`, so that token ids from the model are already this scorer's word ids (see `score_ids`).
    """

    def __init__(self, references: Sequence[Sequence[str]], words: Sequence[str] = ()):
        self.word_ids: dict[str, int] = {}
        for word in words:
            self.word_ids.setdefault(word, len(self.word_ids))
        ref_sentences = [self._ids(sentence) for refs in references for sentence in refs]
        self.base = MAX_WORDS + 1
        self.refs_per_image = np.array([len(refs) for refs in references])
        if (self.refs_per_image == 0).any():
            raise ValueError("every image needs at least one reference")
        self.first_ref = np.concatenate([[0], np.cumsum(self.refs_per_image)[:-1]])
        ref_image = np.repeat(np.arange(len(references)), self.refs_per_image)

        # n-gram counts of every reference sentence: (sentence, key) -> count.
        ref_sentence, keys, order, counts = self._ngram_counts(*_pad(ref_sentences))
        # Document frequency: in how many images' references each n-gram occurs.
        image_keys = np.unique(np.stack([ref_image[ref_sentence], keys], axis=1), axis=0)[:, 1]
        self.keys, df = np.unique(image_keys, return_counts=True)  # every n-gram of the references, sorted
        self.log_images = np.log(float(len(references)))
        self.idf = self.log_images - np.log(np.maximum(df, 1.0))

        # Each reference as a sparse tf-idf vector; entries sorted by (sentence, n-gram index).
        ngram = np.searchsorted(self.keys, keys)
        self.ref_codes = ref_sentence.astype(np.int64) * len(self.keys) + ngram
        self.ref_values = counts * self.idf[ngram]
        self.ref_norms = _norms(ref_sentence, order, self.ref_values, len(ref_sentences))
        self.ref_lengths = _penalty_lengths(np.array([len(s) for s in ref_sentences]))

    # ---- inputs ------------------------------------------------------------------------

    def _ids(self, sentence: str) -> list[int]:
        ids = [self.word_ids.setdefault(word, len(self.word_ids)) for word in sentence.split()]
        if len(self.word_ids) > MAX_WORDS:
            raise ValueError(f"more than {MAX_WORDS} distinct words: n-gram keys would overflow")
        return ids

    def score(self, captions: Sequence[str], images: Sequence[int]) -> np.ndarray:
        """CIDEr-D of each caption against the references of the image at the same position."""
        return self.score_ids(*_pad([self._ids(c) for c in captions]), np.asarray(images))

    def score_ids(self, ids: np.ndarray, lengths: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The fast path: captions as word ids, (n, t) with their lengths (n,); what follows a length is ignored."""
        ids, lengths, images = np.asarray(ids, np.int64), np.asarray(lengths, np.int64), np.asarray(images, np.int64)
        n = len(ids)
        caption, keys, order, counts = self._ngram_counts(ids, lengths)
        position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        known = self.keys[position] == keys
        # An n-gram no reference has gets the largest idf (pycocoevalcap's df of at least 1): it counts in the norm.
        values = counts * np.where(known, self.idf[position], self.log_images)
        norms = _norms(caption, order, values, n)

        # Pair each caption with each reference of its image; look its known n-grams up in that reference.
        pairs_per_caption = self.refs_per_image[images]
        pair_caption = np.repeat(np.arange(n), pairs_per_caption)
        pair_ref = self.first_ref[images][pair_caption] + _ranks(pairs_per_caption)
        caption, position, order, values = caption[known], position[known], order[known], values[known]
        # Entries of one caption are contiguous: expand each to its caption's references.
        entry_start = np.searchsorted(caption, np.arange(n))
        entries_per_caption = np.bincount(caption, minlength=n)
        entry = np.repeat(entry_start[pair_caption], entries_per_caption[pair_caption]) + _ranks(entries_per_caption[pair_caption])
        entry_pair = np.repeat(np.arange(len(pair_caption)), entries_per_caption[pair_caption])
        codes = pair_ref[entry_pair] * len(self.keys) + position[entry]
        found = np.minimum(np.searchsorted(self.ref_codes, codes), len(self.ref_codes) - 1)
        ref_values = np.where(self.ref_codes[found] == codes, self.ref_values[found], 0.0)
        clipped = np.minimum(values[entry], ref_values) * ref_values
        dots = np.bincount(entry_pair * MAX_N + order[entry], clipped, minlength=len(pair_caption) * MAX_N)
        dots = dots.reshape(-1, MAX_N)

        norm_products = norms[pair_caption] * self.ref_norms[pair_ref]
        cosine = np.where(norm_products > 0, dots / np.where(norm_products > 0, norm_products, 1.0), dots)
        delta = _penalty_lengths(lengths)[pair_caption] - self.ref_lengths[pair_ref]
        per_pair = cosine.mean(axis=1) * np.exp(-(delta.astype(np.float64) ** 2) / (2 * SIGMA**2))
        return 10.0 * np.bincount(pair_caption, per_pair, minlength=n) / pairs_per_caption

    # ---- n-grams -----------------------------------------------------------------------

    def _ngram_counts(self, ids: np.ndarray, lengths: np.ndarray):
        """-> (sentence, key, order index 0..3, count) per distinct n-gram of each sentence, sorted by (sentence, key)."""
        n, t = ids.shape
        sentence_parts, key_parts, order_parts = [], [], []
        key = np.zeros((n, t), np.int64)
        for k in range(MAX_N):
            width = t - k
            if width <= 0:
                break
            # Keys of the (k+1)-grams starting at each position: the k-grams' keys plus one more digit.
            key = key[:, :width] + (ids[:, k : k + width] + 1) * self.base**k
            valid = np.arange(width)[None, :] + k < lengths[:, None]
            rows, _ = np.nonzero(valid)
            sentence_parts.append(rows)
            key_parts.append(key[valid])
            order_parts.append(np.full(len(rows), k))
        sentence, keys = np.concatenate(sentence_parts), np.concatenate(key_parts)
        order = np.concatenate(order_parts)
        index = np.lexsort((keys, sentence))
        sentence, keys, order = sentence[index], keys[index], order[index]
        new = np.ones(len(keys), bool)
        new[1:] = (sentence[1:] != sentence[:-1]) | (keys[1:] != keys[:-1])
        starts = np.flatnonzero(new)
        counts = np.diff(np.append(starts, len(keys))).astype(np.float64)
        return sentence[starts], keys[starts], order[starts], counts


def _pad(sentences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sentences], np.int64)
    ids = np.zeros((len(sentences), max(int(lengths.max(initial=0)), 1)), np.int64)
    for row, sentence in enumerate(sentences):
        ids[row, : len(sentence)] = sentence
    return ids, lengths


def _norms(sentence: np.ndarray, order: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Euclidean norm of each sentence's tf-idf vector, per n-gram order: (n, 4)."""
    squares = np.bincount(sentence * MAX_N + order, values**2, minlength=n * MAX_N)
    return np.sqrt(squares.reshape(n, MAX_N))


def _penalty_lengths(words: np.ndarray) -> np.ndarray:
    """The length the Gaussian penalty compares: pycocoevalcap counts a sentence's bigrams (words - 1), not its words."""
    return np.maximum(words, 1) - 1


def _ranks(sizes: np.ndarray) -> np.ndarray:
    """0, 1, .., size - 1 for each size, concatenated: [2, 3] -> [0, 1, 0, 1, 2]."""
    total = int(sizes.sum())
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.arange(total) - starts
