"""Decoding: the trained network run one token at a time, and the greedy and beam-search decoders over it.

`DecodingOptions` is the one description of how to decode: the app maps its widgets to it, the CLI its
flags, the batch job and training's dev scorer pass it whole, and its checks are the only range checks.

`StepDecoder` runs the caption model's trained weights in NumPy, carrying the LSTM state, so that both
decoders take a batch of images and run every live hypothesis of every image in one step per word.
Tokens a caption must never contain (padding, start, unknown) are forbidden by giving them zero
probability before choosing, and the end token is forbidden as the first word, so no caption is empty
and none has holes where a token was cut out later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from .vocabulary import Vocabulary, normalize_caption

if TYPE_CHECKING:
    import keras

METHODS = ("greedy", "beam")
# Beam search costs in proportion to its width; width 10 already scores below 3 and 5 on the dev split.
BEAM_WIDTHS = (1, 10)
# The longest training caption has 38 tokens: 100 is far beyond any useful caption and bounds a request's work.
MAX_NEW_TOKENS = 100
LENGTH_PENALTIES = (0.0, 5.0)
# A prompt is the start of a caption: a few words (and a bounded cost to read back to the user in errors).
MAX_PREFIX_WORDS, MAX_PREFIX_CHARS = 20, 200
NO_REPEAT_NGRAM_SIZES = (0, 2, 3, 4)  # 0: off; 1 would forbid repeating any word, even "a"


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode. The defaults are the recommended decoding: the setting that scored best on the dev split."""

    method: str = "beam"  # "greedy" or "beam"
    beam_width: int = 5  # used by "beam"; beam search of width 1 is greedy
    max_new_tokens: int | None = None  # most tokens to generate after the prefix, <end> included; None: the model's
    length_penalty: float = 2.0  # beam search ranks by GNMT log_prob / ((5 + length) / 6) ** alpha; 0: by log_prob
    prefix: str = ""  # words the caption must start with ("a dog"); decoding continues after them
    no_repeat_ngram_size: int = 0  # forbid any n-gram of this size from appearing twice in a caption; 0: off

    def __post_init__(self):
        # Requests bring numbers as floats or strings: check and convert them here, with sentences for users.
        method = str(self.method).strip().lower()
        if method not in METHODS:
            raise ValueError(f"The decoding method must be 'greedy' or 'beam', not {_shown(self.method)}.")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "beam_width", _whole_number(self.beam_width, "Beam width", *BEAM_WIDTHS))
        if self.max_new_tokens is not None:
            object.__setattr__(self, "max_new_tokens", _whole_number(self.max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS))
        object.__setattr__(self, "length_penalty", _number(self.length_penalty, "Length penalty", *LENGTH_PENALTIES))
        if not isinstance(self.prefix, str):
            raise ValueError(f"The caption's start must be text, not {_shown(self.prefix)}.")
        if len(self.prefix) > MAX_PREFIX_CHARS or len(normalize_caption(self.prefix)) > MAX_PREFIX_WORDS:
            raise ValueError(f"The caption's start may have at most {MAX_PREFIX_WORDS} words ({MAX_PREFIX_CHARS} characters).")
        size = _whole_number(self.no_repeat_ngram_size, "No-repeat n-gram size", 0, NO_REPEAT_NGRAM_SIZES[-1])
        if size not in NO_REPEAT_NGRAM_SIZES:
            raise ValueError(f"No-repeat n-gram size must be one of {', '.join(map(str, NO_REPEAT_NGRAM_SIZES))}, not {size}.")
        object.__setattr__(self, "no_repeat_ngram_size", size)


def _shown(value, limit: int = 40) -> str:
    """A request's value as echoed in an error: short, one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {_shown(value)}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, not {_shown(value)}.")
    return number


def _whole_number(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, not {_shown(value)}.")
    number = _number(value, name, low, high)
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, not {_shown(value)}.")
    return int(number)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # the caption's tokens (the prefix's included), without <start>, ending with <end> if finished
    log_prob: float  # sum of the tokens' log-probabilities


# ---- the network, one step at a time -------------------------------------------------------------


class StepDecoder:
    """Runs the trained caption model one token at a time, in NumPy.

    Decoding calls the network once per generated word; going through
    TensorFlow costs about a millisecond per call on a CPU, more than the math
    itself, so the step is plain NumPy on the trained layers' weights. It
    carries the LSTM state forward instead of re-running the prefix.
    `tests/test_decoding.py` checks it against the Keras model's probabilities.
    """

    def __init__(self, model: keras.Model | Mapping[str, Sequence[np.ndarray]]):
        """model: the Keras caption model, or its layers' weights by layer name (weights.read_decoder_weights)."""
        layer_weights = model.__getitem__ if isinstance(model, Mapping) else lambda name: model.get_layer(name).get_weights()
        weights = lambda name: [np.asarray(w, dtype=np.float32) for w in layer_weights(name)]  # noqa: E731
        self.image_kernel, self.image_bias = weights("image_dense")
        (embeddings,) = weights("word_embedding")
        kernel, self.recurrent_kernel, lstm_bias = weights("text_lstm")
        # Each token's input projection, precomputed: one row lookup instead of a matmul per step.
        self.token_gates = embeddings @ kernel + lstm_bias
        self.decoder_kernel, self.decoder_bias = weights("decoder_dense")
        self.output_kernel, self.output_bias = weights("next_word")
        self.units = units = self.recurrent_kernel.shape[0]
        # What `step` multiplies by: the gates in the order input, forget, output, cell, the three sigmoid
        # gates' halved so that one tanh gives all four, as sigmoid(x) = (tanh(x / 2) + 1) / 2 (halving is exact
        # in floating point: the same numbers as the gate-by-gate form, Keras' order input, forget, cell, output,
        # with fewer NumPy calls). The recurrent kernel is stored gate by gate, (4, units, units): one np.matmul
        # gives the four gates as (n, units) arrays, bit for bit the product by the whole (units, 4 * units)
        # matrix, and faster for a few rows (for 5 rows ~55 us against ~140; see `_logits`).
        order = np.r_[0 : 2 * units, 3 * units : 4 * units, 2 * units : 3 * units]
        scale = np.repeat(np.array([0.5, 0.5, 0.5, 1.0], np.float32), units)
        self._step_token_gates = np.ascontiguousarray(self.token_gates[:, order] * scale)
        self._step_recurrent_kernel = _column_blocks(self.recurrent_kernel[:, order] * scale, units)
        # The output layer also in blocks of columns, for `_logits`.
        self._output_kernel_blocks = _column_blocks(self.output_kernel, OUTPUT_BLOCK_COLUMNS)
        self._output_bias_blocks = _column_blocks(self.output_bias[None], OUTPUT_BLOCK_COLUMNS)[:, 0]

    def project_image(self, features: np.ndarray) -> np.ndarray:
        """(n, feature_dim) features -> (n, units) image branch (dropout is off at inference)."""
        return np.maximum(np.asarray(features, np.float32) @ self.image_kernel + self.image_bias, 0.0)

    def initial_state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        zeros = np.zeros((n, self.units), np.float32)
        return zeros, zeros.copy()

    def step(self, image: np.ndarray, tokens: np.ndarray, state: tuple[np.ndarray, np.ndarray]):
        """One token per row -> (next-token logits (n, vocab), new state); softmax gives the model's probabilities.

        image: (n, units) projected image branch, or (1, units) for rows that all show the same image.
        """
        h, c = state
        gates = self._step_token_gates[tokens]  # a new array: the in-place steps below don't touch the table
        gates = gates.reshape(len(gates), 4, self.units).swapaxes(0, 1)  # a view, gate by gate: (4, n, units)
        gates += np.matmul(h, self._step_recurrent_kernel)
        np.tanh(gates, out=gates)
        sigmoids = gates[:3]
        sigmoids *= 0.5
        sigmoids += 0.5
        input_gate, forget_gate, output_gate, cell_input = gates
        c = forget_gate * c
        c += input_gate * cell_input
        h = np.tanh(c)
        h *= output_gate
        hidden = (image + h) @ self.decoder_kernel
        hidden += self.decoder_bias
        np.maximum(hidden, 0.0, out=hidden)
        return self._logits(hidden), (h, c)

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        """hidden @ output_kernel + output_bias, computed block of columns by block for a few rows.

        NumPy's OpenBLAS multiplies a few rows by a whole (256, vocab) matrix slowly: (5, 256) @ (256, 1564)
        took ~200-240 us, the same product as 25 products by (256, 64) blocks of columns (one np.matmul over
        the stacked blocks) ~95 us, here the same numbers bit for bit for the bundled model. One row (a vector
        product) and many rows (a batch of images' beams) are as fast or faster whole.
        """
        rows = len(hidden)
        if not 1 < rows <= MAX_ROWS_BY_BLOCKS:
            logits = hidden @ self.output_kernel
            logits += self.output_bias
            return logits
        by_block = np.matmul(hidden, self._output_kernel_blocks)  # (blocks, rows, columns of a block)
        logits = np.empty((rows, *self._output_bias_blocks.shape), np.float32)
        np.add(by_block.transpose(1, 0, 2), self._output_bias_blocks, out=logits)
        return logits.reshape(rows, -1)[:, : self.output_kernel.shape[1]]  # without the last block's padding


# `StepDecoder._logits`' blocks: of the widths measured (32 to 391 columns), 64 was about the fastest for 2 to 20
# rows, where it took half the time of the whole matrix or less; from 32 rows on it was no faster
# (artifacts/decode_bench.py --products).
OUTPUT_BLOCK_COLUMNS = 64
MAX_ROWS_BY_BLOCKS = 24


def _column_blocks(matrix: np.ndarray, width: int) -> np.ndarray:
    """(rows, columns) -> (blocks, rows, width): its columns in consecutive blocks, the last padded with zeros."""
    rows, columns = matrix.shape
    blocks = -(-columns // width)
    padded = np.zeros((rows, blocks * width), np.float32)
    padded[:, :columns] = matrix
    return np.ascontiguousarray(padded.reshape(rows, blocks, width).transpose(1, 0, 2))


def limit_blas_threads() -> None:
    """Make NumPy's BLAS single-threaded, for the whole process: the entry points (app, CLI, batch job,
    benchmarks) call it once.

    The step decoder multiplies a few rows (the beams) by 256-row matrices. Spreading such small products
    over threads costs more than it saves, and next to TensorFlow's own threads (the encoder, another
    request's encoder) BLAS threads oversubscribe the CPU: on 2 busy cores, beam search of width 5 took
    ~300 ms per caption with OpenBLAS' default threads and ~10 ms single-threaded (benchmarks/speed.py).
    TensorFlow doesn't use NumPy's BLAS, so the encoder is unaffected.
    """
    threadpool_limits(1, user_api="blas")


# ---- decoding ------------------------------------------------------------------------------------


def decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image_features: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[list[Hypothesis]]:
    """(n, feature_dim) features -> for each image, its hypotheses best first.

    max_new_tokens: the model's budget, used where options.max_new_tokens is None.
    """
    image = step_decoder.project_image(image_features)
    if options.method == "greedy":
        return [[h] for h in greedy_decode(step_decoder, vocab, image, options, max_new_tokens)]
    return beam_search_decode(step_decoder, vocab, image, options, max_new_tokens)


def prefix_ids(vocab: Vocabulary, prefix: str) -> tuple[int, ...]:
    """The prompt's words -> token ids; words the model doesn't know are refused, by name."""
    words = normalize_caption(prefix)
    unknown = list(dict.fromkeys(w for w in words if w not in vocab.stoi or vocab.stoi[w] in vocab.forbidden_ids))
    if unknown:
        listed = ", ".join(f"'{w}'" for w in unknown)
        raise ValueError(f"The model doesn't know the word{'s' if len(unknown) > 1 else ''} {listed}: start the caption with other words.")
    return tuple(vocab.stoi[w] for w in words)


def allowed_log_probs(logits: np.ndarray, vocab: Vocabulary, first_step: bool) -> np.ndarray:
    """Log-softmax over the tokens a caption may contain at this step."""
    log_probs = logits + _forbidden_tokens(vocab, first_step)  # a new array, -inf where forbidden
    log_probs -= log_probs.max(axis=-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
    return log_probs


_FORBIDDEN: dict[tuple, np.ndarray] = {}


def _forbidden_tokens(vocab: Vocabulary, first_step: bool) -> np.ndarray:
    """(vocab,) float32: -inf for the tokens a caption never contains (and <end> as its first word), else 0."""
    forbidden = (*vocab.forbidden_ids, vocab.end_id) if first_step else tuple(vocab.forbidden_ids)
    key = (len(vocab), forbidden)
    if key not in _FORBIDDEN:
        mask = np.zeros(len(vocab), np.float32)
        mask[list(forbidden)] = -np.inf
        _FORBIDDEN[key] = mask
    return _FORBIDDEN[key]


def forbid_repeated_ngrams(log_probs: np.ndarray, captions: np.ndarray, n: int) -> None:
    """In place: the tokens that would make an n-gram of a row's caption appear twice get zero probability.

    captions: (rows, length) tokens so far, one row per row of log_probs (beams all have the same length).
    """
    captions = np.asarray(captions)
    if n == 0 or captions.shape[1] < n:
        return
    ending = captions[:, captions.shape[1] - n + 1 :]  # the last n - 1 tokens: an n-gram's first n - 1
    earlier = np.lib.stride_tricks.sliding_window_view(captions[:, :-1], n - 1, axis=1)  # each earlier (n-1)-gram
    rows, starts = np.nonzero((earlier == ending[:, None, :]).all(axis=2))
    log_probs[rows, captions[rows, starts + n - 1]] = -np.inf  # the token that followed it then


def _start(step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, prefix: tuple[int, ...]):
    """Feed <start> and the prefix to every row: -> (state, logits after the last one, the prefix's log-prob)."""
    n = len(image)
    state = step_decoder.initial_state(n)
    logits, state = step_decoder.step(image, np.full(n, vocab.start_id), state)
    log_prob = np.zeros(n)
    for position, token in enumerate(prefix):
        log_prob += allowed_log_probs(logits, vocab, first_step=position == 0)[:, token]
        logits, state = step_decoder.step(image, np.full(n, token), state)
    return state, logits, log_prob


def greedy_decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[Hypothesis]:
    """The most likely next token at each step. image: the projected image branch (StepDecoder.project_image).

    All images step together; an image's row leaves the batch once its caption has ended.
    """
    n, prefix = len(image), prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    if n == 1:
        return [_greedy_one_image(step_decoder, vocab, image, options, prefix, steps)]
    state, logits, log_probs = _start(step_decoder, vocab, image, prefix)
    captions = np.empty((n, len(prefix) + steps), np.int64)
    captions[:, : len(prefix)] = prefix
    lengths = np.full(n, len(prefix) + steps)
    rows = np.arange(n)  # the images whose captions go on
    for step in range(steps):
        length = len(prefix) + step  # tokens so far
        if step:
            logits, state = step_decoder.step(image[rows], tokens, state)
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        if options.no_repeat_ngram_size:
            forbid_repeated_ngrams(step_log_probs, captions[rows, :length], options.no_repeat_ngram_size)
        tokens = step_log_probs.argmax(axis=-1)
        log_probs[rows] += step_log_probs[np.arange(len(rows)), tokens]
        captions[rows, length] = tokens
        ended = tokens == vocab.end_id
        if ended.any():
            lengths[rows[ended]] = length + 1
            going = ~ended
            rows, tokens, state = rows[going], tokens[going], (state[0][going], state[1][going])
            if not rows.size:
                break
    return [Hypothesis(tuple(captions[i, : lengths[i]].tolist()), float(log_probs[i])) for i in range(n)]


def _greedy_one_image(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, prefix: tuple[int, ...], steps: int
) -> Hypothesis:
    """greedy_decode for one image (the app's case): the same tokens and sum, without the batch's bookkeeping
    of which rows go on, about 10 NumPy calls a step: ~10% of greedy's time for one image (artifacts/decode_bench.py).
    tests/test_decoding_reference.py checks both paths against the reference decoder."""
    state, logits, log_probs = _start(step_decoder, vocab, image, prefix)
    caption, log_prob = list(prefix), float(log_probs[0])
    for step in range(steps):
        if step:
            logits, state = step_decoder.step(image, np.array([token]), state)
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        if options.no_repeat_ngram_size:
            forbid_repeated_ngrams(step_log_probs, np.array([caption], np.int64), options.no_repeat_ngram_size)
        token = int(step_log_probs[0].argmax())
        log_prob += float(step_log_probs[0, token])
        caption.append(token)
        if token == vocab.end_id:
            break
    return Hypothesis(tuple(caption), log_prob)


def length_normalised(log_prob: float, length: int, alpha: float) -> float:
    return log_prob / ((5.0 + length) / 6.0) ** alpha if alpha else log_prob


def beam_search_decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[list[Hypothesis]]:
    """Keeps the `beam_width` best unfinished captions per image; a caption that
    picks <end> moves to that image's finished list. An image is done once it
    has `beam_width` finished captions (or at the token budget, where its live beams
    count as finished). Returns up to `beam_width` distinct captions per image,
    ranked by the length-normalised score.

    Every step chooses for all images at once, with array operations: each image's
    candidates (its beams x the vocabulary) form one row of a matrix, and each row
    is walked in score order the same way: endings join the finished list while it
    has room, until `beam_width` captions go on.
    """
    n, k, prefix = len(image), options.beam_width, prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    if n == 1:
        return [_beam_search_one_image(step_decoder, vocab, image, options, prefix, steps)]
    state, logits, scores = _start(step_decoder, vocab, image, prefix)
    vocab_size, end = logits.shape[1], vocab.end_id
    # Live beams of all images, flattened and grouped by image: row r belongs to image owner[r].
    owner = np.arange(n)
    captions = np.tile(np.array(prefix, np.int64), (n, 1))  # (rows, tokens so far)
    # Each image's finished captions, in the order they finished.
    finished_tokens = np.full((n, k, len(prefix) + steps), end)
    finished_lengths = np.zeros((n, k), np.int64)
    finished_scores = np.zeros((n, k))
    finished_count = np.zeros(n, np.int64)

    for step in range(steps):
        if step:
            logits, state = step_decoder.step(image[owner], tokens, state)
        h, c = state
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        if options.no_repeat_ngram_size:
            forbid_repeated_ngrams(step_log_probs, captions, options.no_repeat_ngram_size)
        candidate_scores = scores[:, None] + step_log_probs

        # One row per image with live beams: its beams' candidates side by side (-inf where it has fewer beams).
        beams = np.bincount(owner, minlength=n)
        images = np.flatnonzero(beams)
        beams = beams[images]
        starts = np.cumsum(beams) - beams  # each image's first row
        if len(owner) == len(images) * beams.max():  # every image has as many beams: a reshape
            per_image = candidate_scores.reshape(len(images), -1)
        else:
            per_image = np.full((len(images), beams.max(), vocab_size), -np.inf)
            beam = np.arange(len(owner)) - np.repeat(starts, beams)
            per_image[np.repeat(np.arange(len(images)), beams), beam] = candidate_scores
            per_image = per_image.reshape(len(images), -1)
        top, top_scores = _best_candidates(per_image, 2 * k)  # enough that k go on even if k others end here
        rows, tokens = starts[:, None] + top // vocab_size, top % vocab_size

        # The walk down each row: stop at the first impossible candidate or once k captions go on.
        possible = np.isfinite(top_scores)
        ends = (tokens == end) | (step == steps - 1)  # at the budget every caption ends
        goes_on = possible & ~ends
        considered = possible & (np.cumsum(goes_on, axis=1) - goes_on < k)
        ending = considered & ends
        end_rank = np.cumsum(ending, axis=1)  # 1, 2, ... among the row's endings
        ending &= end_rank <= (k - finished_count[images])[:, None]  # only while the finished list has room

        i, j = np.nonzero(ending)
        if i.size:
            image_of, slot, row = images[i], finished_count[images[i]] + end_rank[i, j] - 1, rows[i, j]
            length = captions.shape[1] + 1
            finished_tokens[image_of, slot, : length - 1] = captions[row]
            finished_tokens[image_of, slot, length - 1] = tokens[i, j]
            finished_lengths[image_of, slot] = length
            finished_scores[image_of, slot] = top_scores[i, j]
            finished_count[images] += ending.sum(axis=1)

        i, j = np.nonzero(considered & goes_on)
        still_open = finished_count[images[i]] < k  # an image with k finished captions is done
        i, j = i[still_open], j[still_open]
        if not i.size:
            break
        row = rows[i, j]
        tokens = tokens[i, j]
        captions = np.concatenate([captions[row], tokens[:, None]], axis=1)
        owner, scores, state = images[i], top_scores[i, j], (h[row], c[row])

    alpha = options.length_penalty
    results = []
    for i in range(n):
        hyps = [Hypothesis(tuple(finished_tokens[i, s, : finished_lengths[i, s]].tolist()), float(finished_scores[i, s]))
                for s in range(finished_count[i])]
        results.append(sorted(hyps, key=lambda hyp: length_normalised(hyp.log_prob, len(hyp.tokens), alpha), reverse=True))
    return results


def _best_candidates(per_image: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, candidates) scores -> each row's `count` best (their indices, their scores), best first."""
    first_of_top = max(per_image.shape[1] - count, 0)
    top = np.argpartition(per_image, first_of_top, axis=1)[:, first_of_top:]
    image_row = np.arange(len(per_image))[:, None]
    top = top[image_row, np.argsort(-per_image[image_row, top], axis=1, kind="stable")]
    return top, per_image[image_row, top]


def _beam_search_one_image(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, prefix: tuple[int, ...], steps: int
) -> list[Hypothesis]:
    """beam_search_decode for one image (the app's case): the same choices, with the walk down its 2k best
    candidates in Python. The batch's array bookkeeping, about 40 NumPy calls a step, took ~20% of beam 5's
    time for one image (~0.1 ms a step); for one image's 2k candidates plain Python takes a few microseconds.
    tests/test_decoding_reference.py checks both paths against the reference decoder.
    """
    k, end = options.beam_width, vocab.end_id
    state, logits, scores = _start(step_decoder, vocab, image, prefix)
    captions = [prefix]  # the live beams' tokens so far
    finished: list[Hypothesis] = []
    for step in range(steps):
        if step:
            logits, state = step_decoder.step(image, tokens, state)  # the image's one row serves every beam
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        if options.no_repeat_ngram_size:
            forbid_repeated_ngrams(step_log_probs, np.array(captions, np.int64), options.no_repeat_ngram_size)
        candidate_scores = (scores[:, None] + step_log_probs).reshape(1, -1)
        top, top_scores = _best_candidates(candidate_scores, 2 * k)
        rows, next_tokens, next_scores = [], [], []
        for candidate, score in zip(top[0].tolist(), top_scores[0].tolist()):
            if not math.isfinite(score):
                break
            row, token = divmod(candidate, logits.shape[1])
            if token == end or step == steps - 1:  # at the budget every caption ends
                if len(finished) < k:
                    finished.append(Hypothesis(captions[row] + (token,), score))
            else:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                if len(rows) == k:  # only endings that outrank the k-th live caption count
                    break
        if len(finished) == k or not rows:
            break
        captions = [captions[row] + (token,) for row, token in zip(rows, next_tokens)]
        tokens, scores, state = np.array(next_tokens), np.array(next_scores), (state[0][rows], state[1][rows])
    alpha = options.length_penalty
    return sorted(finished, key=lambda hyp: length_normalised(hyp.log_prob, len(hyp.tokens), alpha), reverse=True)
