"""Decoding: greedy, beam search and sampling's contracts on a tiny random model, and sampling's on the bundled one
(tests/test_decoding_reference.py checks the decoders against straightforward ones, test_model.py the network)."""

import dataclasses

import numpy as np
import pytest

from captioner.decoding import DecodingOptions, DecodingTask, Naming, NoCutOffEnding, NoRepeatedWords, NoRepeatNgram
from captioner.vocabulary import FUNCTION_WORDS, SPECIAL_TOKENS, Vocabulary
from tests.conftest import ROOT

GREEDY = DecodingOptions("greedy")
BEAM = DecodingOptions("beam", length_penalty=0.0)
SAMPLE = DecodingOptions("sample", seed=0)


@pytest.fixture(scope="module")
def parts(tiny_captioner):
    rng = np.random.default_rng(0)
    features = rng.random((4, tiny_captioner.config.feature_dim)).astype("float32") * 3
    return tiny_captioner.step_model, tiny_captioner.vocab, features


def decode(parts, options: DecodingOptions, features=None, max_new_tokens: int = 11, **run):
    """Each image's hypotheses (the tiny model's features unless given)."""
    model, vocab, tiny_features = parts
    return DecodingTask(model, vocab, options, max_new_tokens).run(tiny_features if features is None else features, **run)


def allowed_log_probs(logits, vocab, first: bool) -> np.ndarray:
    """The model's log-probabilities over the tokens the vocabulary allows (written out, as a check)."""
    logits = np.where(vocab.allowed_tokens(first), logits.astype(np.float64), -np.inf)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_greedy_equals_beam_width_one(parts):
    greedy = decode(parts, GREEDY)
    beam = decode(parts, dataclasses.replace(BEAM, beam_width=1))
    for (g,), (b,) in zip(greedy, beam):
        assert g.tokens == b.tokens
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-4)


def test_beam_candidates_sorted_distinct_and_at_least_as_good_as_greedy(parts):
    for (g,), hyps in zip(decode(parts, GREEDY), decode(parts, BEAM)):
        scores = [h.log_prob for h in hyps]
        assert scores == sorted(scores, reverse=True) and [h.score for h in hyps] == scores  # no length penalty
        assert len({h.tokens for h in hyps}) == len(hyps) == 5
        assert hyps[0].log_prob >= g.log_prob - 1e-6


@pytest.mark.parametrize("options", [GREEDY, dataclasses.replace(BEAM, beam_width=4), SAMPLE,
                                     DecodingOptions("sample", temperature=2.0, top_p=1.0, seed=1)], ids=str)
def test_captions_never_contain_forbidden_tokens_and_are_never_empty(parts, options):
    _, vocab, _ = parts
    specials = {vocab.stoi[t] for t in SPECIAL_TOKENS}
    for hyps in decode(parts, options):
        for h in hyps:
            words = [t for t in h.tokens if t != vocab.end_id]
            assert words and not specials & set(words)
            assert vocab.end_id not in h.tokens[:-1]  # <end> only ever ends a caption
            assert len(h.tokens) <= 11


def test_forbidden_tokens_get_zero_probability_and_the_rest_renormalise(parts):
    model, vocab, _ = parts
    logits = np.zeros((2, len(vocab)), np.float32)
    logits[:, vocab.unk_id] = 50.0  # the model's favourite would be <unk>
    for options, step, end_allowed in ((GREEDY, 0, False), (GREEDY, 1, True), (DecodingOptions(prefix="a dog"), 0, True)):
        log_probs = DecodingTask(model, vocab, options, 11).log_probs(logits, step, decoder=None)
        assert np.all(np.isneginf(log_probs[:, vocab.forbidden_ids]))
        assert np.isneginf(log_probs[:, vocab.end_id]).all() != end_allowed  # <end> never first: no empty caption
        np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, rtol=1e-6)


def caption_log_prob(model, vocab, features, tokens) -> float:
    """The caption's log-probability, one step model call per token, as decoding must add it up."""
    image = model.project_image(features[None])
    state, token, total = model.initial_state(1), np.array([vocab.start_id]), 0.0
    for i, next_token in enumerate(tokens):
        logits, state = model.step(image, token, state)
        total += allowed_log_probs(logits, vocab, first=i == 0)[0, next_token]
        token = np.array([next_token])
    return total


@pytest.mark.parametrize("options", [GREEDY, BEAM, SAMPLE], ids=str)
def test_log_probs_are_the_sum_of_the_step_log_probs(parts, options):
    model, vocab, features = parts
    for alone in (True, False):  # one image's path, and the batch's
        hypotheses = decode(parts, options, features[:1] if alone else features)
        for image_features, hyps in zip(features, hypotheses):
            for hyp in hyps:
                # (to float32 rounding, which grows with the caption's length: beams are stepped several rows at a
                # time, this check one row in float64)
                assert hyp.log_prob == pytest.approx(caption_log_prob(model, vocab, image_features, hyp.tokens), rel=1e-5, abs=1e-4)


def test_max_new_tokens_and_length_penalty(parts):
    short = decode(parts, DecodingOptions("beam", beam_width=3, max_new_tokens=2))
    assert all(len(h.tokens) <= 2 for hyps in short for h in hyps)
    assert all(len(h.tokens) <= 3 for (h,) in decode(parts, dataclasses.replace(SAMPLE, max_new_tokens=3)))
    penalised = decode(parts, DecodingOptions("beam", beam_width=5, length_penalty=2.0))
    for hyps in penalised:  # ranked by log_prob / ((5 + length) / 6) ** 2
        normalised = [h.log_prob / ((5 + len(h.tokens)) / 6) ** 2 for h in hyps]
        assert normalised == sorted(normalised, reverse=True)
        assert [h.score for h in hyps] == pytest.approx(normalised, abs=1e-12)  # each carries what it was ranked by


@pytest.mark.parametrize("options", [GREEDY, BEAM, SAMPLE], ids=str)
def test_a_prefix_starts_every_caption_and_is_scored_like_the_rest(parts, options):
    model, vocab, features = parts
    prefix = (vocab.stoi["a"], vocab.stoi["dog"])
    prompted = decode(parts, dataclasses.replace(options, prefix="A dog"))
    for image_features, hyps in zip(features, prompted):
        for h in hyps:
            assert h.tokens[:2] == prefix and len(h.tokens) <= 2 + 11
            # Decoding from a prefix continues as the step model would after feeding it (to float32 rounding).
            assert h.log_prob == pytest.approx(caption_log_prob(model, vocab, image_features, h.tokens), rel=1e-5, abs=1e-4)


def test_a_prefix_with_unknown_words_is_refused_by_name(parts):
    with pytest.raises(ValueError, match="doesn't know the words 'zebra', 'unicycle'"):
        decode(parts, DecodingOptions(prefix="a zebra on a unicycle"))


def test_no_repeat_ngram_size_forbids_exactly_the_repeating_tokens():
    log_probs = np.zeros((3, 10))
    NoRepeatNgram(3).apply(log_probs, np.array([(4, 5, 6, 4, 5), (4, 5, 4, 5, 4), (1, 2, 3, 4, 5)]))
    assert np.flatnonzero(np.isneginf(log_probs[0])).tolist() == [6]  # "4 5 6" again
    assert np.flatnonzero(np.isneginf(log_probs[1])).tolist() == [5]  # "5 4 5" again
    assert not np.isneginf(log_probs[2]).any()
    short = np.zeros((1, 10))
    NoRepeatNgram(3).apply(short, np.array([(4, 5)]))  # no earlier bigram to repeat yet
    assert not np.isneginf(short).any()


@pytest.mark.parametrize("options", [GREEDY, BEAM, SAMPLE], ids=str)
def test_no_caption_repeats_a_trigram_when_asked(parts, options):
    for hyps in decode(parts, dataclasses.replace(options, no_repeat_ngram_size=3)):
        for h in hyps:
            trigrams = [h.tokens[i : i + 3] for i in range(len(h.tokens) - 2)]
            assert len(trigrams) == len(set(trigrams))


def test_the_rule_on_repeated_words_forbids_the_words_a_caption_has_but_function_words():
    vocab = Vocabulary(["a", "dog", "on", "grass", "the"])
    a, dog, on, grass = (vocab.stoi[w] for w in ("a", "dog", "on", "grass"))
    assert vocab.once_only_ids.tolist() == [False] * 4 + [False, True, False, True, False]  # specials, a dog on grass the
    log_probs = np.zeros((3, len(vocab)))
    NoRepeatedWords(vocab.once_only_ids).apply(log_probs, np.array([(a, dog, on, a), (a, grass, a, grass), (dog, a, on, on)]))
    forbidden = [np.flatnonzero(np.isneginf(row)).tolist() for row in log_probs]
    assert forbidden == [sorted([dog, a]), [grass], sorted([dog, on])]  # ... and none right after itself ("on on")
    empty = np.zeros((1, len(vocab)))
    NoRepeatedWords(vocab.once_only_ids).apply(empty, np.zeros((1, 0), np.int64))
    assert not np.isneginf(empty).any()


@pytest.mark.parametrize("options", [GREEDY, BEAM, SAMPLE], ids=str)
def test_no_caption_names_a_thing_twice_unless_asked(parts, options):
    _, vocab, _ = parts
    def repeats(hypotheses) -> int:  # captions with a word other than a function word twice, or a word twice in a row
        words = [[vocab.itos[t] for t in h.tokens if vocab.itos[t] not in FUNCTION_WORDS | set(SPECIAL_TOKENS)]
                 for hyps in hypotheses for h in hyps]
        stutters = [any(a == b for a, b in zip(h.tokens, h.tokens[1:])) for hyps in hypotheses for h in hyps]
        return sum(len(w) != len(set(w)) for w in words) + sum(stutters)
    assert repeats(decode(parts, options)) == 0
    assert repeats(decode(parts, dataclasses.replace(options, repeat_words=True))) > 0  # the tiny model repeats itself


def test_the_cut_off_rule_forbids_the_end_right_after_those_words():
    never_final = np.zeros(10, bool)
    never_final[[4, 6]] = True
    log_probs = np.zeros((3, 10))
    NoCutOffEnding(never_final, end_id=2).apply(log_probs, np.array([(5, 4), (4, 5), (7, 6)]))
    assert np.isneginf(log_probs).tolist() == [[i == 2 for i in range(10)], [False] * 10, [i == 2 for i in range(10)]]
    empty = np.zeros((1, 10))
    NoCutOffEnding(never_final, end_id=2).apply(empty, np.zeros((1, 0), np.int64))  # nothing yet: <end> is the vocabulary's
    assert not np.isneginf(empty).any()


def test_options_convert_request_values_and_default_to_the_recommended_decoding():
    assert DecodingOptions() == DecodingOptions("beam", 5, None, 2.0, "", 0, 1.0, 0.9, None)
    assert DecodingOptions(" Beam ", "4", 12.0, "0.5") == DecodingOptions("beam", 4, 12, 0.5)
    assert DecodingOptions("Sample", temperature="0.7", top_p="1", seed=42.0) == DecodingOptions("sample", temperature=0.7, top_p=1.0, seed=42)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "top-k"}, "must be 'greedy', 'beam' or 'sample', not 'top-k'"),
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
        # Sampling's fields are checked whatever the method, so a bad value never waits for the method to change.
        ({"temperature": 0}, "Temperature must be between 0.1 and 2, not 0"),
        ({"method": "sample", "temperature": 2.5}, "Temperature must be between 0.1 and 2"),
        ({"temperature": "hot"}, "Temperature must be a number, not 'hot'"),
        ({"temperature": float("inf")}, "between 0.1 and 2"),
        ({"top_p": 0}, "Top-p must be more than 0"),
        ({"top_p": 1.5}, "Top-p must be between 0 and 1"),
        ({"top_p": float("nan")}, "Top-p must be between 0 and 1"),
        ({"seed": -1}, "Seed must be between 0 and 4,294,967,295"),
        ({"seed": 2**32}, "Seed must be between 0 and 4,294,967,295"),
        ({"seed": 1.5}, "Seed must be a whole number"),
        ({"seed": True}, "Seed must be a whole number"),
        ({"seed": "lucky"}, "Seed must be a number, not 'lucky'"),
    ],
)
def test_bad_options_are_refused_with_a_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        DecodingOptions(**kwargs)
    assert len(str(error.value)) < 200  # a huge value is not echoed whole


def test_only_sampling_draws_several_captions_per_image(parts):
    assert [len(hyps) for hyps in decode(parts, SAMPLE, samples_per_image=3)] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="Only sampling"):
        decode(parts, GREEDY, samples_per_image=3)


# ---- sampling on the bundled model: a distribution worth drawing from --------------------------------


@pytest.fixture(scope="module")
def bundled():
    from captioner import Captioner

    return Captioner.from_pretrained(ROOT / "weights")


@pytest.fixture(scope="module")
def photo_features(bundled, example_images):
    return bundled.encode(example_images)


def sampled(captioner, features, **options) -> list[tuple[int, ...]]:
    """Each image's sampled caption (tokens)."""
    task = DecodingTask(captioner.step_model, captioner.vocab, DecodingOptions("sample", **options), captioner.config.max_new_tokens)
    return [hyps[0].tokens for hyps in task.run(features)]


def test_the_same_seed_gives_the_same_captions(bundled, photo_features):
    assert sampled(bundled, photo_features, seed=7) == sampled(bundled, photo_features, seed=7)
    by_seed = [sampled(bundled, photo_features, seed=seed) for seed in range(5)]
    assert len({tuple(captions) for captions in by_seed}) == 5  # and other seeds other captions
    # Without a seed, each call draws anew.
    assert sampled(bundled, photo_features, temperature=1.5) != sampled(bundled, photo_features, temperature=1.5)


def test_an_images_sampled_caption_does_not_depend_on_the_images_decoded_with_it(bundled, photo_features):
    together = sampled(bundled, photo_features, seed=3)
    assert [sampled(bundled, photo_features[i : i + 1], seed=3)[0] for i in range(len(photo_features))] == together
    assert sampled(bundled, photo_features[::-1], seed=3) == together[::-1]


def test_a_tiny_top_p_gives_the_greedy_caption(bundled, photo_features):
    task = DecodingTask(bundled.step_model, bundled.vocab, GREEDY, bundled.config.max_new_tokens)
    for features in (photo_features, photo_features[:1]):  # the batch's path and one image's
        greedy = [hyps[0] for hyps in task.run(features)]
        for seed in range(3):
            for options in ({"top_p": 1e-6, "seed": seed}, {"top_p": 1e-6, "temperature": 2.0, "seed": seed}):
                sample_task = DecodingTask(bundled.step_model, bundled.vocab, DecodingOptions("sample", **options), bundled.config.max_new_tokens)
                assert [hyps[0] for hyps in sample_task.run(features)] == greedy  # tokens, log-probability, score


def test_a_higher_temperature_gives_more_varied_captions(bundled, photo_features):
    dog = photo_features[[0]]
    distinct = {temperature: len({sampled(bundled, dog, temperature=temperature, top_p=1.0, seed=seed)[0] for seed in range(30)})
                for temperature in (0.25, 1.5)}
    # Measured: 5 or so distinct captions in 30 at 0.25, all 30 or nearly at 1.5.
    assert distinct[1.5] >= 2 * distinct[0.25] and distinct[1.5] >= distinct[0.25] + 10, distinct


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.4, 0.8)])
def test_first_words_are_drawn_from_the_tempered_nucleus(bundled, photo_features, temperature, top_p):
    model, vocab = bundled.step_model, bundled.vocab
    features = photo_features[[1]]
    logits, _ = model.step(model.project_image(features), np.array([vocab.start_id]), model.initial_state(1))
    expected = np.exp(allowed_log_probs(logits, vocab, first=True)[0] / temperature)
    expected /= expected.sum()
    ranked = np.argsort(-expected, kind="stable")
    nucleus = ranked[: np.searchsorted(np.cumsum(expected[ranked]), top_p) + 1]  # the fewest likeliest holding top_p
    expected_in_nucleus = np.zeros_like(expected)
    expected_in_nucleus[nucleus] = expected[nucleus] / expected[nucleus].sum()

    options = DecodingOptions("sample", temperature=temperature, top_p=top_p, max_new_tokens=1)
    task, rng = DecodingTask(model, vocab, options, 1), np.random.default_rng(0)
    draws = [h.tokens[0] for _ in range(10) for h in task.run(features, rng=rng, samples_per_image=2000)[0]]
    observed = np.bincount(draws, minlength=len(vocab)) / len(draws)
    assert observed[expected_in_nucleus == 0].sum() == 0  # nothing outside the nucleus
    np.testing.assert_allclose(observed, expected_in_nucleus, atol=0.012)  # 20,000 draws: a few standard errors


@pytest.mark.parametrize("options", [GREEDY, BEAM, DecodingOptions(), SAMPLE, DecodingOptions(name_objects=False)], ids=str)
def test_no_caption_ends_on_a_word_the_vocabulary_says_none_ends_on(bundled, photo_features, options):
    """The words the bundled model's captions of the examples end on, made words no caption ends on: every caption
    goes on past them (or runs to the budget). Without such words (a folder written before the rule) it decodes as
    before: the tiny model's tests above, and tests/test_decoding_reference.py."""
    vocab, words = bundled.vocab, bundled.vocab.itos[len(SPECIAL_TOKENS):]

    def endings(vocabulary) -> set[int]:
        naming = Naming.grown(bundled.step_model, vocabulary, bundled.naming.visual_words) if options.name_objects else None
        task = DecodingTask(bundled.step_model, vocabulary, options, bundled.config.max_new_tokens, naming)
        found = task.run(photo_features, class_probabilities=bundled.head.probabilities(photo_features))
        return {h.tokens[-2] for hyps in found for h in hyps if len(h.tokens) > 1 and h.tokens[-1] == vocab.end_id}

    enders = {t for t in endings(Vocabulary(words)) if t < len(vocab)}  # no rule (the words naming adds may end one)
    assert enders
    assert not endings(Vocabulary(words, never_final=[vocab.itos[t] for t in enders])) & enders
