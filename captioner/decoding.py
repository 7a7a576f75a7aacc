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
from dataclasses import dataclass

import keras
import numpy as np
from threadpoolctl import threadpool_limits

from .vocabulary import Vocabulary, normalize_caption

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

    def __init__(self, model: keras.Model):
        weights = lambda name: [np.asarray(w, dtype=np.float32) for w in model.get_layer(name).get_weights()]  # noqa: E731
        self.image_kernel, self.image_bias = weights("image_dense")
        (embeddings,) = weights("word_embedding")
        kernel, self.recurrent_kernel, lstm_bias = weights("text_lstm")
        # Each token's input projection, precomputed: one row lookup instead of a matmul per step.
        self.token_gates = embeddings @ kernel + lstm_bias
        self.decoder_kernel, self.decoder_bias = weights("decoder_dense")
        self.output_kernel, self.output_bias = weights("next_word")
        self.units = self.recurrent_kernel.shape[0]

    def project_image(self, features: np.ndarray) -> np.ndarray:
        """(n, feature_dim) features -> (n, units) image branch (dropout is off at inference)."""
        return np.maximum(np.asarray(features, np.float32) @ self.image_kernel + self.image_bias, 0.0)

    def initial_state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        zeros = np.zeros((n, self.units), np.float32)
        return zeros, zeros.copy()

    def step(self, image: np.ndarray, tokens: np.ndarray, state: tuple[np.ndarray, np.ndarray]):
        """One token per row -> (next-token logits (n, vocab), new state); softmax gives the model's probabilities.

        Keras' LSTM gate order is input, forget, cell, output.
        """
        h, c = state
        z = self.token_gates[tokens] + h @ self.recurrent_kernel
        i, f, g, o = np.split(z, 4, axis=1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        hidden = np.maximum((image + h) @ self.decoder_kernel + self.decoder_bias, 0.0)
        return hidden @ self.output_kernel + self.output_bias, (h, c)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free form of 1 / (1 + exp(-x))


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
    unknown = [w for w in words if w not in vocab.stoi or vocab.stoi[w] in vocab.forbidden_ids]
    if unknown:
        listed = ", ".join(f"'{w}'" for w in dict.fromkeys(unknown))
        raise ValueError(f"The model doesn't know the word{'s' if len(unknown) > 1 else ''} {listed}: start the caption with other words.")
    return tuple(vocab.stoi[w] for w in words)


def allowed_log_probs(logits: np.ndarray, vocab: Vocabulary, first_step: bool) -> np.ndarray:
    """Log-softmax over the tokens a caption may contain at this step."""
    logits = logits.copy()
    logits[:, vocab.forbidden_ids] = -np.inf
    if first_step:
        logits[:, vocab.end_id] = -np.inf
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def forbid_repeated_ngrams(log_probs: np.ndarray, captions: list[tuple[int, ...]], n: int) -> None:
    """In place: the tokens that would make an n-gram of a row's caption appear twice get zero probability."""
    if n == 0:
        return
    for row, caption in enumerate(captions):
        if len(caption) < n - 1:
            continue
        ending = caption[len(caption) - n + 1 :]
        for i in range(len(caption) - n + 1):
            if caption[i : i + n - 1] == ending:
                log_probs[row, caption[i + n - 1]] = -np.inf


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
    """The most likely next token at each step. image: the projected image branch (StepDecoder.project_image)."""
    n, prefix = len(image), prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    state, logits, log_probs = _start(step_decoder, vocab, image, prefix)
    captions = [prefix] * n
    finished = np.zeros(n, dtype=bool)
    for step in range(steps):
        if step:
            logits, state = step_decoder.step(image, tokens, state)
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        forbid_repeated_ngrams(step_log_probs, captions, options.no_repeat_ngram_size)
        tokens = np.where(finished, vocab.end_id, step_log_probs.argmax(axis=-1))
        log_probs += np.where(finished, 0.0, step_log_probs[np.arange(n), tokens])
        captions = [c if done else c + (int(t),) for c, t, done in zip(captions, tokens, finished)]
        finished |= tokens == vocab.end_id
        if finished.all():
            break
    return [Hypothesis(caption, float(lp)) for caption, lp in zip(captions, log_probs)]


def length_normalised(log_prob: float, length: int, alpha: float) -> float:
    return log_prob / ((5.0 + length) / 6.0) ** alpha if alpha else log_prob


def beam_search_decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[list[Hypothesis]]:
    """Keeps the `beam_width` best unfinished captions per image; a caption that
    picks <end> moves to that image's finished list. An image is done once it
    has `beam_width` finished captions (or at the token budget, where its live beams
    count as finished). Returns up to `beam_width` distinct captions per image,
    ranked by the length-normalised score."""
    n, k, prefix = len(image), options.beam_width, prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    state, logits, prefix_log_prob = _start(step_decoder, vocab, image, prefix)
    # Live beams of all images, flattened: row r belongs to image owner[r].
    owner = np.arange(n)
    captions: list[tuple[int, ...]] = [prefix] * n
    scores = prefix_log_prob
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for step in range(steps):
        if step:
            logits, state = step_decoder.step(image[owner], tokens, state)
        h, c = state
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        forbid_repeated_ngrams(step_log_probs, captions, options.no_repeat_ngram_size)
        candidate_scores = scores[:, None] + step_log_probs
        last_step = step == steps - 1

        next_rows, next_tokens, next_scores, next_owner = [], [], [], []
        for i in range(n):
            if len(finished[i]) >= k:
                continue
            rows = np.flatnonzero(owner == i)
            flat = candidate_scores[rows].ravel()
            # 2k candidates: enough that k continue even if k others end here.
            top = np.argpartition(-flat, min(2 * k, flat.size - 1))[: 2 * k]
            live = 0
            for index in top[np.argsort(-flat[top])]:
                score = flat[index]
                if not np.isfinite(score):
                    break
                row, token = rows[index // logits.shape[1]], int(index % logits.shape[1])
                caption = captions[row] + (token,)
                if token == vocab.end_id or last_step:
                    if len(finished[i]) < k:
                        finished[i].append(Hypothesis(caption, float(score)))
                else:
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(score)
                    next_owner.append(i)
                    live += 1
                    if live == k:  # only endings that outrank the k-th live caption count
                        break
        if not next_rows:
            break
        next_rows = np.array(next_rows)
        captions = [captions[r] + (t,) for r, t in zip(next_rows, next_tokens)]
        owner, tokens, scores = np.array(next_owner), np.array(next_tokens), np.array(next_scores)
        state = (h[next_rows], c[next_rows])

    alpha = options.length_penalty
    return [
        sorted(hyps, key=lambda hyp: length_normalised(hyp.log_prob, len(hyp.tokens), alpha), reverse=True)[:k]
        for hyps in finished
    ]
