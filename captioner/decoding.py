"""Greedy and beam-search decoding over the NumPy step decoder.

Both decoders take a batch of images and run every live hypothesis of every
image in one `StepDecoder.step` call per word. Tokens a caption must never
contain (padding, start, unknown) are forbidden by giving them zero
probability before choosing, and the end token is forbidden as the first word,
so no caption is empty and none has holes where a token was cut out later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import StepDecoder
from .vocabulary import Vocabulary


@dataclass(frozen=True)
class DecodingOptions:
    method: str = "greedy"  # "greedy" or "beam"
    beam_width: int = 5  # used by "beam"; beam search with width 1 is greedy
    max_length: int | None = None  # most tokens to generate (end token included); None: the model's max_length
    length_penalty: float = 0.0  # GNMT alpha: rank by log_prob / ((5 + length) / 6) ** alpha; 0 ranks by log_prob

    def __post_init__(self):
        if self.method not in ("greedy", "beam"):
            raise ValueError(f"method must be 'greedy' or 'beam', not {self.method!r}")
        if not 1 <= int(self.beam_width) <= 50:
            raise ValueError(f"beam_width must be between 1 and 50, not {self.beam_width}")
        if self.max_length is not None and not 1 <= int(self.max_length) <= 200:
            raise ValueError(f"max_length must be between 1 and 200, not {self.max_length}")
        if not 0.0 <= float(self.length_penalty) <= 5.0:
            raise ValueError(f"length_penalty must be between 0 and 5, not {self.length_penalty}")


# Beam search of width 5 with a GNMT length penalty of 2 gave the bundled model its best dev-split CIDEr
# (training/evaluate.py); the app offers it by default and training keeps the epoch that does best with it.
RECOMMENDED = DecodingOptions("beam", beam_width=5, length_penalty=2.0)


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, without <start>, ending with <end> if the caption finished
    log_prob: float  # sum of the tokens' log-probabilities


def decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image_features: np.ndarray, options: DecodingOptions, default_max_length: int
) -> list[list[Hypothesis]]:
    """(n, feature_dim) features -> for each image, its hypotheses best first."""
    max_length = options.max_length or default_max_length
    image = step_decoder.project_image(image_features)
    if options.method == "greedy":
        return [[h] for h in greedy_decode(step_decoder, vocab, image, max_length)]
    return beam_search_decode(step_decoder, vocab, image, options.beam_width, max_length, options.length_penalty)


def allowed_log_probs(logits: np.ndarray, vocab: Vocabulary, first_step: bool) -> np.ndarray:
    """Log-softmax over the tokens a caption may contain at this step."""
    logits = logits.copy()
    logits[:, vocab.forbidden_ids] = -np.inf
    if first_step:
        logits[:, vocab.end_id] = -np.inf
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy_decode(step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, max_length: int) -> list[Hypothesis]:
    n = len(image)
    state = step_decoder.initial_state(n)
    tokens = np.full(n, vocab.start_id)
    generated = np.zeros((n, 0), dtype=np.int64)
    log_probs = np.zeros(n)
    finished = np.zeros(n, dtype=bool)
    for step in range(max_length):
        logits, state = step_decoder.step(image, tokens, state)
        step_log_probs = allowed_log_probs(logits, vocab, first_step=step == 0)
        tokens = np.where(finished, vocab.end_id, step_log_probs.argmax(axis=-1))
        log_probs += np.where(finished, 0.0, step_log_probs[np.arange(n), tokens])
        generated = np.concatenate([generated, tokens[:, None]], axis=1)
        finished |= tokens == vocab.end_id
        if finished.all():
            break
    return [Hypothesis(_until_end(row, vocab.end_id), float(lp)) for row, lp in zip(generated, log_probs)]


def _until_end(tokens, end_id: int) -> tuple[int, ...]:
    tokens = [int(t) for t in tokens]
    return tuple(tokens[: tokens.index(end_id) + 1]) if end_id in tokens else tuple(tokens)


def length_normalised(log_prob: float, length: int, alpha: float) -> float:
    return log_prob / ((5.0 + length) / 6.0) ** alpha if alpha else log_prob


def beam_search_decode(
    step_decoder: StepDecoder, vocab: Vocabulary, image: np.ndarray, beam_width: int, max_length: int, length_penalty: float
) -> list[list[Hypothesis]]:
    """Keeps the `beam_width` best unfinished prefixes per image; a prefix that
    picks <end> moves to that image's finished list. An image is done once it
    has `beam_width` finished captions (or at max_length, where its live beams
    count as finished). Returns up to `beam_width` distinct captions per image."""
    n, k = len(image), beam_width
    # Live beams of all images, flattened: row r belongs to image owner[r].
    owner = np.arange(n)
    prefixes: list[tuple[int, ...]] = [()] * n
    scores = np.zeros(n)
    tokens = np.full(n, vocab.start_id)
    state = step_decoder.initial_state(n)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for step in range(max_length):
        logits, (h, c) = step_decoder.step(image[owner], tokens, state)
        candidate_scores = scores[:, None] + allowed_log_probs(logits, vocab, first_step=step == 0)
        last_step = step == max_length - 1

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
                prefix = prefixes[row] + (token,)
                if token == vocab.end_id or last_step:
                    if len(finished[i]) < k:
                        finished[i].append(Hypothesis(prefix, float(score)))
                else:
                    next_rows.append(row)
                    next_tokens.append(token)
                    next_scores.append(score)
                    next_owner.append(i)
                    live += 1
                    if live == k:  # only endings that outrank the k-th live prefix count
                        break
        if not next_rows:
            break
        next_rows = np.array(next_rows)
        prefixes = [prefixes[r] + (t,) for r, t in zip(next_rows, next_tokens)]
        owner, tokens, scores = np.array(next_owner), np.array(next_tokens), np.array(next_scores)
        state = (h[next_rows], c[next_rows])

    return [
        sorted(hyps, key=lambda hyp: length_normalised(hyp.log_prob, len(hyp.tokens), length_penalty), reverse=True)[:k]
        for hyps in finished
    ]
