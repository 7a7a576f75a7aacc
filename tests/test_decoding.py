"""Greedy and beam search on a tiny random model: their contracts, not their words."""

import numpy as np
import pytest

from captioner.decoding import DecodingOptions, allowed_log_probs, beam_search_decode, decode, greedy_decode
from captioner.vocabulary import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def parts(tiny_captioner):
    rng = np.random.default_rng(0)
    features = rng.random((4, tiny_captioner.config.feature_dim)).astype("float32") * 3
    return tiny_captioner.step_decoder, tiny_captioner.vocab, tiny_captioner.step_decoder.project_image(features), features


def test_greedy_equals_beam_width_one(parts):
    step, vocab, image, _ = parts
    greedy = greedy_decode(step, vocab, image, max_length=11)
    beam = beam_search_decode(step, vocab, image, beam_width=1, max_length=11, length_penalty=0.0)
    for g, (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)


def test_beam_candidates_sorted_distinct_and_at_least_as_good_as_greedy(parts):
    step, vocab, image, _ = parts
    greedy = greedy_decode(step, vocab, image, max_length=11)
    for g, hyps in zip(greedy, beam_search_decode(step, vocab, image, beam_width=5, max_length=11, length_penalty=0.0)):
        scores = [h.log_prob for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({h.tokens for h in hyps}) == len(hyps) == 5
        assert hyps[0].log_prob >= g.log_prob - 1e-6


def test_captions_never_contain_forbidden_tokens_and_are_never_empty(parts):
    step, vocab, image, _ = parts
    specials = {vocab.stoi[t] for t in SPECIAL_TOKENS}
    for hyps in beam_search_decode(step, vocab, image, beam_width=4, max_length=11, length_penalty=0.0) + [[h] for h in greedy_decode(step, vocab, image, 11)]:
        for h in hyps:
            words = [t for t in h.tokens if t != vocab.end_id]
            assert words and not specials & set(words)
            assert vocab.end_id not in h.tokens[:-1]  # <end> only ever ends a caption
            assert len(h.tokens) <= 11


def test_forbidden_tokens_get_zero_probability_and_the_rest_renormalise(parts):
    _, vocab, _, _ = parts
    logits = np.zeros((2, len(vocab)))
    logits[:, vocab.unk_id] = 50.0  # the model's favourite would be <unk>
    log_probs = allowed_log_probs(logits, vocab, first_step=True)
    assert np.all(np.isneginf(log_probs[:, vocab.forbidden_ids + [vocab.end_id]]))
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0)


def test_log_probs_are_the_sum_of_the_step_log_probs(parts):
    step, vocab, image, _ = parts
    (hyp,) = greedy_decode(step, vocab, image[:1], max_length=11)
    state, token, total = step.initial_state(1), np.array([vocab.start_id]), 0.0
    for i, next_token in enumerate(hyp.tokens):
        logits, state = step.step(image[:1], token, state)
        total += allowed_log_probs(logits, vocab, first_step=i == 0)[0, next_token]
        token = np.array([next_token])
    assert hyp.log_prob == pytest.approx(total, abs=1e-5)


def test_max_length_and_length_penalty(parts):
    step, vocab, image, features = parts
    short = decode(step, vocab, features, DecodingOptions("beam", beam_width=3, max_length=2), default_max_length=11)
    assert all(len(h.tokens) <= 2 for hyps in short for h in hyps)
    penalised = decode(step, vocab, features, DecodingOptions("beam", beam_width=5, length_penalty=2.0), default_max_length=11)
    for hyps in penalised:  # ranked by log_prob / ((5 + length) / 6) ** 2
        normalised = [h.log_prob / ((5 + len(h.tokens)) / 6) ** 2 for h in hyps]
        assert normalised == sorted(normalised, reverse=True)


@pytest.mark.parametrize("kwargs", [dict(method="sample"), dict(beam_width=0), dict(beam_width=51), dict(max_length=0), dict(length_penalty=-1)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        DecodingOptions(**kwargs)
