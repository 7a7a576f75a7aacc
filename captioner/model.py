"""The merge CNN-LSTM captioner, defined once for training and inference.

    image features -> Dropout(0.3) -> Dense(256, relu) ---------------------+
                                                                           add -> Dense(256, relu) -> Dense(vocab, softmax)
    caption prefix -> Embedding(vocab, 50, mask_zero, frozen GloVe)        |
                   -> Dropout(0.3) -> LSTM(256) ---------------------------+

The LSTM returns its output at every step, so one forward pass scores every
prefix of a caption at once (the original model's one-prefix-per-sample
objective at a fraction of the cost); the image branch is broadcast over steps.

The image encoder (encoder.py) is kept apart: its features are computed once
per image, and cached for training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
import keras
import numpy as np
from keras import layers
from threadpoolctl import threadpool_limits


@dataclass(frozen=True)
class ModelConfig:
    """What the weights folder's config.json records about the network."""

    encoder: str
    vocab_size: int
    max_length: int  # longest training caption in tokens, <start> and <end> included
    feature_dim: int
    embedding_dim: int = 50
    units: int = 256
    dropout: float = 0.3

    @property
    def max_new_tokens(self) -> int:
        """The most tokens decoding generates by default: <end> included, <start> (given) not."""
        return self.max_length - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def build_caption_model(config: ModelConfig, embedding_matrix: np.ndarray | None = None) -> keras.Model:
    """Inputs: image features (n, feature_dim) and token ids (n, t), 0 = padding.

    Output: (n, t, vocab) next-token probabilities after each prefix.
    """
    features = keras.Input((config.feature_dim,), name="image_features")
    tokens = keras.Input((None,), dtype="int32", name="caption_prefix")

    image = layers.Dropout(config.dropout, name="image_dropout")(features)
    image = layers.Dense(config.units, activation="relu", name="image_dense")(image)
    image = layers.Reshape((1, config.units), name="image_per_step")(image)  # broadcast over steps

    embedding = layers.Embedding(
        config.vocab_size,
        config.embedding_dim,
        mask_zero=True,
        trainable=False,  # frozen GloVe vectors, as in the original model
        embeddings_initializer=keras.initializers.Constant(embedding_matrix) if embedding_matrix is not None else "uniform",
        name="word_embedding",
    )
    text = embedding(tokens)
    text = layers.Dropout(config.dropout, name="text_dropout")(text)
    text = layers.LSTM(config.units, return_sequences=True, name="text_lstm")(text)

    merged = layers.Add(name="merge")([image, text])
    merged = layers.Dense(config.units, activation="relu", name="decoder_dense")(merged)
    probs = layers.Dense(config.vocab_size, activation="softmax", name="next_word")(merged)
    return keras.Model([features, tokens], probs, name="merge_captioner")


class StepDecoder:
    """Runs the trained caption model one token at a time, in NumPy.

    Decoding calls the network once per generated word; going through
    TensorFlow costs about a millisecond per call on a CPU, more than the math
    itself, so the step is plain NumPy on the trained layers' weights. It
    carries the LSTM state forward instead of re-running the prefix.
    `tests/test_model.py` checks it against the Keras model's probabilities.
    """

    def __init__(self, model: keras.Model):
        limit_blas_threads()
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


def limit_blas_threads() -> None:
    """Make NumPy's BLAS single-threaded, for the whole process.

    The step decoder multiplies a few rows (the beams) by 256-row matrices. Spreading such small products
    over threads costs more than it saves, and next to TensorFlow's own threads (the encoder, another
    request's encoder) BLAS threads oversubscribe the CPU: on 2 busy cores, beam search of width 5 took
    ~300 ms per caption with OpenBLAS' default threads and ~10 ms single-threaded (benchmarks/speed.py).
    TensorFlow doesn't use NumPy's BLAS, so the encoder is unaffected.
    """
    threadpool_limits(1, user_api="blas")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free form of 1 / (1 + exp(-x))
