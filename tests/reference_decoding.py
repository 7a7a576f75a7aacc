"""The straightforward decoders that the fast ones in captioner/decoding.py must agree with.

These are the decoders as first written (one image at a time in Python inside each beam step, the
LSTM gate by gate, the vocabulary's rule, n-gram blocking, repeated words and the words no caption ends on written
out caption by caption): easy to check by reading, and slow. The fast decoders (DecodingTask's GreedyDecoder and
BeamSearchDecoder) choose with array operations over all images at once; tests/test_decoding_reference.py
checks that both give the same captions and scores.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

from captioner.decoding import DecodingOptions, Hypothesis, length_normalised, prefix_ids
from captioner.model import StepModel
from captioner.vocabulary import FUNCTION_WORDS, SPECIAL_TOKENS, Vocabulary


def reference_step(decoder: StepModel, image: np.ndarray, tokens: np.ndarray, state):
    """StepModel.step as Keras defines the LSTM: gates input, forget, cell, output, each with its own sigmoid."""
    h, c = state
    z = decoder.token_gates[tokens] + h @ decoder.recurrent_kernel
    i, f, g, o = np.split(z, 4, axis=1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    hidden = np.maximum((image + h) @ decoder.decoder_kernel + decoder.decoder_bias, 0.0)
    return hidden @ decoder.output_kernel + decoder.output_bias, (h, c)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def allowed_log_probs(logits: np.ndarray, vocab: Vocabulary, first_step: bool) -> np.ndarray:
    """Log-softmax over the tokens a caption may contain at this step (the vocabulary's rule)."""
    log_probs = np.where(vocab.allowed_tokens(first_step), logits, -np.inf).astype(np.float32)
    log_probs -= log_probs.max(axis=-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
    return log_probs


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


def forbid_repeated_words(log_probs: np.ndarray, captions: list[tuple[int, ...]], vocab: Vocabulary, options: DecodingOptions) -> None:
    """In place: unless options.repeat_words, the words a row's caption already has get zero probability, but for
    the function words ("a", "on", "the"), and so does its last word, whatever it is."""
    if options.repeat_words:
        return
    for row, caption in enumerate(captions):
        for token in caption:
            if vocab.itos[token] not in FUNCTION_WORDS and vocab.itos[token] not in SPECIAL_TOKENS:
                log_probs[row, token] = -np.inf
        if caption:
            log_probs[row, caption[-1]] = -np.inf


def forbid_cut_off_endings(log_probs: np.ndarray, captions: list[tuple[int, ...]], vocab: Vocabulary) -> None:
    """In place: <end> gets zero probability right after a word the vocabulary says no caption ends on."""
    for row, caption in enumerate(captions):
        if caption and vocab.itos[caption[-1]] in vocab.never_final:
            log_probs[row, vocab.end_id] = -np.inf


def start(model: StepModel, vocab: Vocabulary, image: np.ndarray, prefix: tuple[int, ...]):
    """Feed <start> and the prefix to every row: -> (state, logits after the last one, the prefix's log-prob)."""
    n = len(image)
    state = model.initial_state(n)
    logits, state = reference_step(model, image, np.full(n, vocab.start_id), state)
    log_prob = np.zeros(n)
    for position, token in enumerate(prefix):
        log_prob += allowed_log_probs(logits, vocab, first_step=position == 0)[:, token]
        logits, state = reference_step(model, image, np.full(n, token), state)
    return state, logits, log_prob


def greedy_decode(
    model: StepModel, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[Hypothesis]:
    """The most likely next token at each step. image: the projected image branch (StepModel.project_image)."""
    n, prefix = len(image), prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    state, logits, log_probs = start(model, vocab, image, prefix)
    captions = [prefix] * n
    finished = np.zeros(n, dtype=bool)
    for step in range(steps):
        if step:
            logits, state = reference_step(model, image, tokens, state)
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        forbid_repeated_ngrams(step_log_probs, captions, options.no_repeat_ngram_size)
        forbid_repeated_words(step_log_probs, captions, vocab, options)
        forbid_cut_off_endings(step_log_probs, captions, vocab)
        tokens = np.where(finished, vocab.end_id, step_log_probs.argmax(axis=-1))
        log_probs += np.where(finished, 0.0, step_log_probs[np.arange(n), tokens])
        captions = [c if done else c + (int(t),) for c, t, done in zip(captions, tokens, finished)]
        finished |= tokens == vocab.end_id
        if finished.all():
            break
    return [Hypothesis(caption, float(lp), float(lp)) for caption, lp in zip(captions, log_probs)]


def beam_search_decode(
    model: StepModel, vocab: Vocabulary, image: np.ndarray, options: DecodingOptions, max_new_tokens: int
) -> list[list[Hypothesis]]:
    """Keeps the `beam_width` best unfinished captions per image; a caption that
    picks <end> moves to that image's finished list. An image is done once it
    has `beam_width` finished captions (or at the token budget, where its live beams
    count as finished). Returns up to `beam_width` distinct captions per image,
    ranked by the length-normalised score."""
    n, k, prefix = len(image), options.beam_width, prefix_ids(vocab, options.prefix)
    steps = options.max_new_tokens or max_new_tokens
    state, logits, prefix_log_prob = start(model, vocab, image, prefix)
    # Live beams of all images, flattened: row r belongs to image owner[r].
    owner = np.arange(n)
    captions: list[tuple[int, ...]] = [prefix] * n
    scores = prefix_log_prob
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]

    for step in range(steps):
        if step:
            logits, state = reference_step(model, image[owner], tokens, state)
        h, c = state
        step_log_probs = allowed_log_probs(logits, vocab, first_step=not prefix and step == 0)
        forbid_repeated_ngrams(step_log_probs, captions, options.no_repeat_ngram_size)
        forbid_repeated_words(step_log_probs, captions, vocab, options)
        forbid_cut_off_endings(step_log_probs, captions, vocab)
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
            for index in top[np.argsort(-flat[top], kind="stable")]:  # ties: the earlier candidate first
                score = flat[index]
                if not np.isfinite(score):
                    break
                row, token = rows[index // logits.shape[1]], int(index % logits.shape[1])
                caption = captions[row] + (token,)
                if token == vocab.end_id or last_step:
                    if len(finished[i]) < k:
                        finished[i].append(Hypothesis(caption, float(score), length_normalised(float(score), len(caption), options.length_penalty)))
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

    return [sorted(hyps, key=lambda hyp: hyp.score, reverse=True)[:k] for hyps in finished]


def constrained_beam_search_decode(
    model: StepModel, vocab: Vocabulary, grown: Vocabulary, image: np.ndarray, groups: tuple[tuple[int, ...], ...],
    options: DecodingOptions, max_new_tokens: int,
) -> list[Hypothesis]:
    """One image's constrained beam search (Anderson et al. 2017) written out: a beam of `beam_width` captions per
    set of groups named so far; each step, every set is filled from all of its captions' candidates over the
    whole grown vocabulary (less the words naming a group the caption lacks) and from the captions of smaller
    sets taking the word that completes it, best first; the image is done once the set with every group has
    `beam_width` finished captions. Its rules on words: the new words (ids from len(vocab)) only as the groups'
    own, no word right after itself, and the rules on repeated words and endings. model: the grown network
    (Naming.model); image: its projected image."""
    k = options.beam_width if options.method == "beam" else 1
    alpha = options.length_penalty if k > 1 else 0.0
    prefix = prefix_ids(vocab, options.prefix)
    bits_of: dict[int, int] = {}
    for g, group in enumerate(groups):
        for token in group:
            bits_of[token] = bits_of.get(token, 0) | 1 << g
    full = (1 << len(groups)) - 1
    named_by = lambda tokens: functools.reduce(operator.or_, [bits_of.get(t, 0) for t in tokens], 0)
    state, logits, prefix_log_prob = start(model, grown, image, prefix)
    captions, scores, sets = [prefix], [float(prefix_log_prob[0])], [named_by(prefix)]
    finished: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(full + 1)]
    steps = options.max_new_tokens or max_new_tokens
    for step in range(steps):
        if step:
            logits, state = reference_step(model, image, tokens, state)
        offsets = np.zeros(logits.shape, np.float32)
        offsets[:, len(vocab):] = -np.inf
        offsets[:, [t for t in bits_of if t >= len(vocab)]] = 0.0
        if step or prefix:
            offsets[np.arange(len(captions)), [caption[-1] for caption in captions]] = -np.inf
        log_probs = allowed_log_probs(logits + offsets, grown, first_step=not prefix and step == 0)
        forbid_repeated_words(log_probs, captions, grown, options)
        forbid_cut_off_endings(log_probs, captions, grown)
        candidate_scores = np.asarray(scores)[:, None] + log_probs
        last_step = step == steps - 1
        next_rows, next_tokens, next_scores, next_sets = [], [], [], []
        if len(finished[full]) < k:
            for named in range(full + 1):
                walk = []
                for row, have in enumerate(sets):
                    for token in range(logits.shape[1]):
                        if have | bits_of.get(token, 0) == named:  # staying (naming nothing new), or arriving
                            walk.append((float(candidate_scores[row, token]), row, token))
                walk.sort(key=lambda candidate: -candidate[0])
                going = 0
                for score, row, token in walk:
                    if not np.isfinite(score):
                        break
                    if token == vocab.end_id or last_step:
                        if len(finished[named]) < k:
                            finished[named].append((captions[row] + (token,), score))
                    else:
                        next_rows.append(row)
                        next_tokens.append(token)
                        next_scores.append(score)
                        next_sets.append(named)
                        going += 1
                        if going == k:
                            break
        if not next_rows:
            break
        state = (state[0][next_rows], state[1][next_rows])
        captions = [captions[row] + (token,) for row, token in zip(next_rows, next_tokens)]
        tokens, scores, sets = np.array(next_tokens), next_scores, next_sets
    best = full if finished[full] else max((named for named in range(full + 1) if finished[named]),
                                           key=lambda named: bin(named).count("1"), default=0)
    return sorted((Hypothesis(tokens, score, length_normalised(score, len(tokens), alpha)) for tokens, score in finished[best]),
                  key=lambda h: h.score, reverse=True)
