"""The network matches the published merge architecture, and its NumPy step model computes what Keras does."""

import keras
import numpy as np
import pytest

from captioner.model import ModelConfig, StepModel, build_caption_model


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(7)
    config = ModelConfig(encoder="resnet50", vocab_size=1850, context_length=34, feature_dim=2048)
    return build_caption_model(config, np.random.default_rng(0).normal(size=(1850, 50)).astype("float32"))


def test_layers_match_the_merge_architecture(model):
    layer = model.get_layer
    assert model.input_shape == [(None, 2048), (None, None)]
    assert model.output_shape == (None, None, 1850)
    assert layer("image_dropout").rate == pytest.approx(0.3)
    assert (layer("image_dense").units, layer("image_dense").activation.__name__) == (256, "relu")
    embedding = layer("word_embedding")
    assert (embedding.input_dim, embedding.output_dim, embedding.mask_zero, embedding.trainable) == (1850, 50, True, False)
    assert layer("text_dropout").rate == pytest.approx(0.3)
    assert (layer("text_lstm").units, layer("text_lstm").return_sequences) == (256, True)
    assert isinstance(layer("merge"), keras.layers.Add)
    assert (layer("decoder_dense").units, layer("decoder_dense").activation.__name__) == (256, "relu")
    assert (layer("next_word").units, layer("next_word").activation.__name__) == (1850, "softmax")
    # the GloVe matrix is frozen: only the dense layers and the LSTM train
    assert sum(np.prod(w.shape) for w in model.non_trainable_weights) == 1850 * 50


def test_embedding_starts_from_the_given_matrix():
    matrix = np.random.default_rng(1).normal(size=(20, 50)).astype("float32")
    model = build_caption_model(ModelConfig("mobilenet_v2", 20, 10, 1280), matrix)
    np.testing.assert_array_equal(model.get_layer("word_embedding").get_weights()[0], matrix)


def test_config_reads_folders_written_before_the_rename():
    old = ModelConfig.from_dict({"encoder": "mobilenet_v2", "vocab_size": 20, "max_length": 10, "feature_dim": 1280})
    assert old == ModelConfig("mobilenet_v2", 20, 10, 1280)
    assert old.max_new_tokens == 9  # <start> is given, not generated


def test_the_step_model_gives_the_keras_models_probabilities(model):
    """Feeding tokens one at a time with the carried LSTM state gives the Keras model's probabilities."""
    rng = np.random.default_rng(3)
    features = rng.random((3, 2048)).astype("float32")
    lengths = [9, 4, 1]
    tokens = np.zeros((3, 9), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(1, 1850, n)
    expected = model.predict([features, tokens], verbose=0)

    step_model = StepModel(model)
    image, state = step_model.project_image(features), step_model.initial_state(3)
    for t in range(9):
        logits, state = step_model.step(image, tokens[:, t], state)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for row, n in enumerate(lengths):
            if t < n:  # beyond a row's length Keras masks the padding; the step model is never fed it
                np.testing.assert_allclose(probs[row], expected[row, t], atol=1e-5)


def test_the_teacher_forced_lstm_outputs_are_the_steps(tiny_captioner):
    """What explain.py's teacher-forced pass reads: the LSTM's outputs, as the step gives them one token at a time."""
    model, vocab = tiny_captioner.step_model, tiny_captioner.vocab
    tokens = np.array([vocab.start_id, 5, 9, 4, 12])
    state, hidden = model.initial_state(1), []
    for token in tokens:
        _, state = model.step(np.zeros((1, model.units), np.float32), np.array([token]), state)
        hidden.append(state[0][0])
    np.testing.assert_array_equal(model.lstm_outputs(tokens), hidden)
