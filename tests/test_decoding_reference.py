"""The fast decoders (captioner/decoding.py's DecodingTask with its GreedyDecoder and BeamSearchDecoder: every
beam step chosen with array operations over all images, and their paths for one image) give exactly the
captions of the straightforward ones (tests/reference_decoding.py), on a tiny random model and on the bundled
weights, for every decoding option.

Scores are compared to 1e-5 rather than bit for bit: the fast greedy decoder drops finished captions
from the batch, and a matrix product's rounding can depend on how many rows it has.
"""

from __future__ import annotations

import numpy as np
import pytest

from captioner.decoding import DecodingOptions, DecodingTask, TokenDecoder
from tests import reference_decoding as reference
from tests.conftest import ROOT

OPTIONS = [
    DecodingOptions("greedy"),
    DecodingOptions("greedy", prefix="a dog", no_repeat_ngram_size=2),
    DecodingOptions("beam", beam_width=1, length_penalty=0.0),
    DecodingOptions("beam", beam_width=3, length_penalty=0.0),
    DecodingOptions(),  # the recommended decoding: beam 5, length penalty 2
    DecodingOptions("beam", beam_width=5, no_repeat_ngram_size=3),
    DecodingOptions("beam", beam_width=4, prefix="a man", max_new_tokens=6),
    DecodingOptions("beam", beam_width=10, length_penalty=1.0),
    DecodingOptions("beam", beam_width=3, repeat_words=True),
]


def assert_same_hypotheses(fast, slow):
    assert len(fast) == len(slow)
    for fast_hyps, slow_hyps in zip(fast, slow):
        assert [h.tokens for h in fast_hyps] == [h.tokens for h in slow_hyps]
        np.testing.assert_allclose([h.log_prob for h in fast_hyps], [h.log_prob for h in slow_hyps], rtol=0, atol=1e-5)
        np.testing.assert_allclose([h.score for h in fast_hyps], [h.score for h in slow_hyps], rtol=0, atol=1e-5)


def decode(captioner, features: np.ndarray, options: DecodingOptions):
    return DecodingTask(captioner.step_model, captioner.vocab, options, captioner.config.max_new_tokens).run(features)


def compare(captioner, features: np.ndarray, options: DecodingOptions):
    model, vocab, budget = captioner.step_model, captioner.vocab, captioner.config.max_new_tokens
    image = model.project_image(features)
    if options.method == "greedy":
        slow = [[h] for h in reference.greedy_decode(model, vocab, image, options, budget)]
    else:
        slow = reference.beam_search_decode(model, vocab, image, options, budget)
    fast = decode(captioner, features, options)
    assert_same_hypotheses(fast, slow)
    return fast


@pytest.mark.parametrize("rows", [1, 6, 40])  # output layer whole, by blocks (2 to model.MAX_ROWS_BY_BLOCKS rows), whole
def test_the_step_is_the_gate_by_gate_lstm(tiny_captioner, rows):
    step = tiny_captioner.step_model
    rng = np.random.default_rng(1)
    image = step.project_image(rng.random((rows, tiny_captioner.config.feature_dim)).astype(np.float32) * 3)
    state = step.initial_state(rows)
    reference_state = state
    for _ in range(5):
        tokens = rng.integers(0, len(tiny_captioner.vocab), rows)
        logits, state = step.step(image, tokens, state)
        expected, reference_state = reference.reference_step(step, image, tokens, reference_state)
        # The LSTM is bit for bit. The logits are to float32 rounding: for a few rows the step multiplies by
        # blocks of the output layer's columns, and OpenBLAS may sum a product's last columns in another order.
        np.testing.assert_array_equal(state[0], reference_state[0])
        np.testing.assert_array_equal(state[1], reference_state[1])
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_tiny_random_model_same_captions_as_the_reference(tiny_captioner, options):
    features = np.random.default_rng(0).random((12, tiny_captioner.config.feature_dim)).astype(np.float32) * 3
    compare(tiny_captioner, features, options)
    compare(tiny_captioner, features[:1], options)  # one image alone: no other image's beams around it


def test_an_image_decodes_the_same_alone_and_in_a_batch(tiny_captioner):
    features = np.random.default_rng(4).random((9, tiny_captioner.config.feature_dim)).astype(np.float32) * 3
    options = DecodingOptions()
    together = decode(tiny_captioner, features, options)
    for i in range(len(features)):
        (alone,) = decode(tiny_captioner, features[i : i + 1], options)
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_the_one_image_paths_give_what_the_batch_bookkeeping_gives_for_one_image(tiny_captioner, monkeypatch, options):
    features = np.random.default_rng(5).random((6, tiny_captioner.config.feature_dim)).astype(np.float32) * 3
    fast = [decode(tiny_captioner, features[i : i + 1], options) for i in range(len(features))]
    monkeypatch.setattr(TokenDecoder, "one_image_path", False)
    for i, alone in enumerate(fast):
        assert decode(tiny_captioner, features[i : i + 1], options) == alone  # tokens, log-probs and scores, bit for bit


@pytest.fixture(scope="module")
def bundled():
    """The bundled model stepping in NumPy's float32, as the reference does (the int8 step: test_bundled_weights.py)."""
    from captioner import Captioner
    from captioner.weights import read_folder

    return Captioner.from_folder(read_folder(ROOT / "weights"), decoder="float32")


@pytest.fixture(scope="module")
def bundled_features(bundled, example_images):
    """The example photos' features and noisy copies of them: 30 images the model has opinions about."""
    features = bundled.encode(example_images)
    noise = np.random.default_rng(2).normal(0, 0.3, (2, *features.shape)).astype(np.float32)
    return np.concatenate([features, *np.maximum(features + noise, 0)])


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_bundled_weights_same_captions_as_the_reference(bundled, bundled_features, options):
    hypotheses = compare(bundled, bundled_features, options)
    for i in (0, 11, 25):  # one image alone: decoding's path for a single image
        compare(bundled, bundled_features[i : i + 1], options)
    words = bundled.vocab.decode(hypotheses[0][0].tokens).split()
    assert len(words) >= 3  # real captions, not degenerate ones
