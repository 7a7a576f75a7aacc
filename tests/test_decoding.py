"""Decoding: the NumPy step decoder against Keras, and greedy and beam search's contracts on a tiny random model."""

import dataclasses

import keras
import numpy as np
import pytest

from captioner.decoding import (
    DecodingOptions,
    StepDecoder,
    allowed_log_probs,
    beam_search_decode,
    decode,
    forbid_repeated_ngrams,
    greedy_decode,
)
from captioner.model import ModelConfig, build_caption_model
from captioner.vocabulary import SPECIAL_TOKENS

GREEDY = DecodingOptions("greedy")
BEAM = DecodingOptions("beam", length_penalty=0.0)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(7)
    config = ModelConfig(encoder="resnet50", vocab_size=1850, context_length=34, feature_dim=2048)
    return build_caption_model(config, np.random.default_rng(0).normal(size=(1850, 50)).astype("float32"))


@pytest.fixture(scope="module")
def parts(tiny_captioner):
    rng = np.random.default_rng(0)
    features = rng.random((4, tiny_captioner.config.feature_dim)).astype("float32") * 3
    return tiny_captioner.step_decoder, tiny_captioner.vocab, tiny_captioner.step_decoder.project_image(features), features


def test_step_decoder_matches_the_full_prefix_model(model):
    """Feeding tokens one at a time with the carried LSTM state gives the Keras model's probabilities."""
    rng = np.random.default_rng(3)
    features = rng.random((3, 2048)).astype("float32")
    lengths = [9, 4, 1]
    tokens = np.zeros((3, 9), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, 1850, n)
    expected = model.predict([features, tokens], verbose=0)

    decoder = StepDecoder(model)
    image, state = decoder.project_image(features), decoder.initial_state(3)
    for t in range(9):
        logits, state = decoder.step(image, tokens[:, t], state)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for row, n in enumerate(lengths):
            if t < n:  # beyond a row's length Keras masks the padding; the step decoder is never fed it
                np.testing.assert_allclose(probs[row], expected[row, t], atol=1e-5)


def test_greedy_equals_beam_width_one(parts):
    step, vocab, image, _ = parts
    greedy = greedy_decode(step, vocab, image, GREEDY, 11)
    beam = beam_search_decode(step, vocab, image, dataclasses.replace(BEAM, beam_width=1), 11)
    for g, (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)


def test_beam_candidates_sorted_distinct_and_at_least_as_good_as_greedy(parts):
    step, vocab, image, _ = parts
    greedy = greedy_decode(step, vocab, image, GREEDY, 11)
    for g, hyps in zip(greedy, beam_search_decode(step, vocab, image, BEAM, 11)):
        scores = [h.log_prob for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({h.tokens for h in hyps}) == len(hyps) == 5
        assert hyps[0].log_prob >= g.log_prob - 1e-6


def test_captions_never_contain_forbidden_tokens_and_are_never_empty(parts):
    step, vocab, image, _ = parts
    specials = {vocab.stoi[t] for t in SPECIAL_TOKENS}
    beams = beam_search_decode(step, vocab, image, dataclasses.replace(BEAM, beam_width=4), 11)
    for hyps in beams + [[h] for h in greedy_decode(step, vocab, image, GREEDY, 11)]:
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


def caption_log_prob(step, vocab, image, tokens) -> float:
    """The caption's log-probability, one step decoder call per token, as decoding must add it up."""
    state, token, total = step.initial_state(1), np.array([vocab.start_id]), 0.0
    for i, next_token in enumerate(tokens):
        logits, state = step.step(image[None], token, state)
        total += allowed_log_probs(logits, vocab, first_step=i == 0)[0, next_token]
        token = np.array([next_token])
    return total


def test_log_probs_are_the_sum_of_the_step_log_probs(parts):
    step, vocab, image, _ = parts
    (hyp,) = greedy_decode(step, vocab, image[:1], GREEDY, 11)
    assert hyp.log_prob == pytest.approx(caption_log_prob(step, vocab, image[0], hyp.tokens), abs=1e-5)


def test_max_new_tokens_and_length_penalty(parts):
    step, vocab, image, features = parts
    short = decode(step, vocab, features, DecodingOptions("beam", beam_width=3, max_new_tokens=2), 11)
    assert all(len(h.tokens) <= 2 for hyps in short for h in hyps)
    penalised = decode(step, vocab, features, DecodingOptions("beam", beam_width=5, length_penalty=2.0), 11)
    for hyps in penalised:  # ranked by log_prob / ((5 + length) / 6) ** 2
        normalised = [h.log_prob / ((5 + len(h.tokens)) / 6) ** 2 for h in hyps]
        assert normalised == sorted(normalised, reverse=True)


@pytest.mark.parametrize("options", [GREEDY, BEAM])
def test_a_prefix_starts_every_caption_and_is_scored_like_the_rest(parts, options):
    step, vocab, image, features = parts
    prefix = (vocab.stoi["a"], vocab.stoi["dog"])
    prompted = decode(step, vocab, features, dataclasses.replace(options, prefix="A dog"), 11)
    for hyps in prompted:
        for h in hyps:
            assert h.tokens[:2] == prefix and len(h.tokens) <= 2 + 11
    # Greedy from a prefix continues exactly as the step decoder would after feeding it.
    (hyp,) = greedy_decode(step, vocab, image[:1], dataclasses.replace(GREEDY, prefix="a dog"), 11)
    assert hyp.log_prob == pytest.approx(caption_log_prob(step, vocab, image[0], hyp.tokens), abs=1e-5)


def test_a_prefix_with_unknown_words_is_refused_by_name(parts):
    step, vocab, _, features = parts
    with pytest.raises(ValueError, match="doesn't know the words 'zebra', 'unicycle'"):
        decode(step, vocab, features, DecodingOptions(prefix="a zebra on a unicycle"), 11)


def test_no_repeat_ngram_size_forbids_exactly_the_repeating_tokens():
    log_probs = np.zeros((3, 10))
    forbid_repeated_ngrams(log_probs, np.array([(4, 5, 6, 4, 5), (4, 5, 4, 5, 4), (1, 2, 3, 4, 5)]), n=3)
    assert np.flatnonzero(np.isneginf(log_probs[0])).tolist() == [6]  # "4 5 6" again
    assert np.flatnonzero(np.isneginf(log_probs[1])).tolist() == [5]  # "5 4 5" again
    assert not np.isneginf(log_probs[2]).any()
    short = np.zeros((1, 10))
    forbid_repeated_ngrams(short, np.array([(4, 5)]), n=3)  # no earlier bigram to repeat yet
    assert not np.isneginf(short).any()


@pytest.mark.parametrize("options", [GREEDY, BEAM])
def test_no_caption_repeats_a_trigram_when_asked(parts, options):
    step, vocab, _, features = parts
    for hyps in decode(step, vocab, features, dataclasses.replace(options, no_repeat_ngram_size=3), 11):
        for h in hyps:
            trigrams = [h.tokens[i : i + 3] for i in range(len(h.tokens) - 2)]
            assert len(trigrams) == len(set(trigrams))


def test_options_convert_request_values_and_default_to_the_recommended_decoding():
    assert DecodingOptions() == DecodingOptions("beam", 5, None, 2.0, "", 0)
    assert DecodingOptions(" Beam ", "4", 12.0, "0.5") == DecodingOptions("beam", 4, 12, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="sample"), "'greedy' or 'beam'"),
        (dict(beam_width=0), "Beam width must be between 1 and 10"),
        (dict(beam_width=11), "between 1 and 10"),
        (dict(beam_width=2.5), "whole number"),
        (dict(beam_width=True), "whole number"),
        (dict(beam_width="five"), "a number"),
        (dict(max_new_tokens=0), "Max new tokens must be between 1 and 100"),
        (dict(length_penalty=-1), "Length penalty must be between 0 and 5"),
        (dict(length_penalty=float("nan")), "between 0 and 5"),
        (dict(prefix=5), "must be text"),
        (dict(prefix="a " * 30), "at most 20 words"),
        (dict(no_repeat_ngram_size=1), "one of 0, 2, 3, 4"),
        (dict(method="x" * 10_000), "not 'xxxx"),
    ],
)
def test_bad_options_are_refused_with_a_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        DecodingOptions(**kwargs)
    assert len(str(error.value)) < 200  # a huge value is not echoed whole
