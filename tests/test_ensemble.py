"""Ensembles (captioner/ensemble.py, model.EnsembleStepModel): a model with itself decodes exactly as alone, the
combination is the weighted mean of the members' log-probabilities renormalised, weights and vocabularies checked."""

import numpy as np
import pytest

from captioner import Captioner
from captioner.decoding import DecodingOptions
from captioner.ensemble import Ensemble
from tests.conftest import TINY_WORDS
from tests.test_decoding import allowed_log_probs
from training.random_weights import write_random_weights

SETTINGS = [DecodingOptions("greedy"), DecodingOptions("beam", beam_width=3, length_penalty=0.0), DecodingOptions()]


@pytest.fixture(scope="module")
def other_captioner(tmp_path_factory):
    """Another tiny model with the same words: another encoder (ResNet50's 2,048 features), 16 units, other weights."""
    folder = tmp_path_factory.mktemp("other_weights")
    return Captioner.from_pretrained(write_random_weights(folder, "resnet50", TINY_WORDS, units=16, context_length=12, seed=1))


def features_for(*captioners, images: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((images, c.config.feature_dim)).astype("float32") * 3 for c in captioners]


def assert_same_captions(ensemble_captions, single_captions):
    for ours, theirs in zip(ensemble_captions, single_captions, strict=True):
        assert ours.text == theirs.text
        assert [text for text, _ in ours.candidates] == [text for text, _ in theirs.candidates]
        np.testing.assert_allclose([p for _, p in ours.candidates], [p for _, p in theirs.candidates], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", SETTINGS, ids=["greedy", "beam3", "beam5_lp2"])
@pytest.mark.parametrize("images", [1, 4], ids=["one image", "batch"])
def test_a_model_with_itself_captions_exactly_as_alone(tiny_captioner, options, images):
    ensemble = Ensemble([tiny_captioner, tiny_captioner], weights=[0.5, 0.5])
    (features,) = features_for(tiny_captioner, images=images)
    assert_same_captions(ensemble.caption_features([features, features], options),
                         tiny_captioner.caption_features(features, options))


def test_a_model_with_itself_captions_a_photo_as_alone(tiny_captioner, example_images):
    ensemble = Ensemble.from_folders([tiny_captioner.weights.path, tiny_captioner.weights.path])
    assert ensemble.weights == (0.5, 0.5)
    assert_same_captions([ensemble.caption(example_images[0])], [tiny_captioner.caption(example_images[0])])
    assert_same_captions(ensemble.caption_batch(example_images[:3], method="greedy"),
                         tiny_captioner.caption_batch(example_images[:3], method="greedy"))


@pytest.mark.parametrize("options", SETTINGS[:2], ids=["greedy", "beam3"])
def test_a_member_of_weight_zero_changes_nothing(tiny_captioner, other_captioner, options):
    """Each member reads its own features and the weights say whose words count: all of them the first's here."""
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[1, 0])
    assert_same_captions(ensemble.caption_features(features, options), tiny_captioner.caption_features(features[0], options))
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[0, 2])
    assert_same_captions(ensemble.caption_features(features, options), other_captioner.caption_features(features[1], options))


def test_the_next_word_is_the_weighted_mean_of_the_members_log_probs_renormalised(tiny_captioner, other_captioner):
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[1, 3])
    assert ensemble.weights == (0.25, 0.75)
    tokens = np.array([tiny_captioner.vocab.stoi[w] for w in ("a", "dog", "runs", "a")])
    expected = 0
    for captioner, member_features, weight in zip((tiny_captioner, other_captioner), features, ensemble.weights):
        model = captioner.step_model
        _, state = model.step(model.project_image(member_features), np.full(4, captioner.vocab.start_id), model.initial_state(4))
        logits, _ = model.step(model.project_image(member_features), tokens, state)
        expected = expected + weight * allowed_log_probs(logits, captioner.vocab, first=False)
    expected = allowed_log_probs(expected, tiny_captioner.vocab, first=False)

    model, task = ensemble.step_model, ensemble.decoding_task(method="greedy")
    image = model.project_image(np.concatenate(features, axis=1))
    _, state = model.step(image, np.full(4, tiny_captioner.vocab.start_id), model.initial_state(4))
    logits, _ = model.step(image, tokens, state)
    np.testing.assert_allclose(task._allowed_log_probs(logits, first=False), expected, atol=1e-5)


@pytest.mark.parametrize("weights, message", [
    ([1], "needs 2 weights, one per model, not 1"),
    ([1, 1, 1], "needs 2 weights, one per model, not 3"),
    ([1, -1], "numbers of at least 0"),
    ([1, float("nan")], "numbers of at least 0"),
    ([True, 1], "numbers of at least 0"),
    (["1", 1], "numbers of at least 0"),
    ([0, 0], "At least one of an ensemble's weights must be more than 0."),
])
def test_bad_weights_are_refused_with_a_sentence(tiny_captioner, weights, message):
    with pytest.raises(ValueError, match=message):
        Ensemble([tiny_captioner, tiny_captioner], weights=weights)


def test_models_with_different_vocabularies_are_refused(tiny_captioner, tmp_path):
    fewer = Captioner.from_pretrained(write_random_weights(tmp_path / "fewer", "mobilenet_v2", TINY_WORDS[:-1], units=32, context_length=12))
    with pytest.raises(ValueError, match=r"Model 2's vocabulary differs from model 1's \(18 tokens against 19\): .* share one vocabulary"):
        Ensemble([tiny_captioner, fewer])
    swapped = Captioner.from_pretrained(write_random_weights(tmp_path / "swapped", "mobilenet_v2", TINY_WORDS[1::-1] + TINY_WORDS[2:],
                                                             units=32, context_length=12))
    with pytest.raises(ValueError, match="token 4 is 'dog' there, 'a' in model 1"):
        Ensemble([tiny_captioner, swapped])
    with pytest.raises(ValueError, match="at least two models, not 1"):
        Ensemble([tiny_captioner])


def test_features_must_come_one_array_per_model(tiny_captioner, other_captioner):
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner])
    with pytest.raises(ValueError, match="Expected 2 feature arrays, one per model"):
        ensemble.caption_features(features[:1])
    with pytest.raises(ValueError, match=r"Model 1 \(mobilenet_v2\) reads 1,280 features per image, not \(2048,\)"):
        ensemble.caption_features(features[::-1])


def test_the_ensemble_evaluation_takes_several_values_per_flag():
    from pathlib import Path

    from training.config import parse_config
    from training.evaluate_ensemble import EvaluateEnsembleConfig, weighting

    config = parse_config(EvaluateEnsembleConfig, ["--members", "weights", "weights/resnet50", "--work-dirs", "a", "b",
                                                   "--weightings", "0.5,0.5", "0.3,0.7"])
    assert config.members == (Path("weights"), Path("weights/resnet50")) and config.work_dirs == (Path("a"), Path("b"))
    assert config.weightings == ("0.5,0.5", "0.3,0.7") and config.split == "dev"
    assert weighting("0.3,0.7") == [0.3, 0.7]
    with pytest.raises(ValueError, match="numbers separated by commas, like 0.5,0.5, not '0.5;0.5'"):
        weighting("0.5;0.5")
