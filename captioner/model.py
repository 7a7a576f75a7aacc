"""The merge CNN-LSTM captioner, defined once for training and inference.

    image features -> Dropout(0.3) -> Dense(256, relu) ---------------------+
                                                                           add -> Dense(256, relu) -> Dense(vocab, softmax)
    caption prefix -> Embedding(vocab, 50, mask_zero, frozen GloVe)        |
                   -> Dropout(0.3) -> LSTM(256) ---------------------------+

The LSTM returns its output at every step, so one forward pass scores every
prefix of a caption at once (the original model's one-prefix-per-sample
objective at a fraction of the cost); the image branch is broadcast over steps.

This file is the network only. The image encoder (encoder.py) is kept apart:
its features are computed once per image, and cached for training; decoding.py
runs the trained weights one token at a time for inference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .lazy import keras, layers  # imported on first use: serving decodes without Keras


# What a config may claim. Generous for any model this project trains (the bundled one: vocabulary 1,564, 38
# tokens, 1,280 features, 50-d embeddings, 256 units; keras.applications' largest features are 2,048-d), and
# small enough that the decoder's arrays fit in memory: at most MAX_DECODER_PARAMETERS (400 MB as float32).
CONFIG_BOUNDS = {"vocab_size": (4, 100_000), "context_length": (3, 256), "feature_dim": (1, 4096),
                 "embedding_dim": (1, 1024), "units": (1, 2048)}
MAX_DECODER_PARAMETERS = 100_000_000


@dataclass(frozen=True)
class ModelConfig:
    """What the weights folder's config.json records about the network."""

    encoder: str
    vocab_size: int
    context_length: int  # longest training caption in tokens, <start> and <end> included
    feature_dim: int
    embedding_dim: int = 50
    units: int = 256
    dropout: float = 0.3

    def __post_init__(self):
        """Bounds checked before any array is made: a config.json claiming absurd sizes gets a sentence, not a
        MemoryError minutes later (read_folder turns the ValueError into a WeightsError)."""
        for name, (low, high) in CONFIG_BOUNDS.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number from {low:,} to {high:,}, not {value!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number from 0 to below 1, not {self.dropout!r}")
        parameters = sum(math.prod(shape) for shapes in self.weight_shapes().values() for shape in shapes)
        if parameters > MAX_DECODER_PARAMETERS:
            raise ValueError(f"the decoder would have {parameters:,} parameters, more than {MAX_DECODER_PARAMETERS:,}")

    @property
    def max_new_tokens(self) -> int:
        """The most tokens decoding generates by default: <end> included, <start> (given) not."""
        return self.context_length - 1

    def weight_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Each layer's weight shapes in build_caption_model's network, by layer name (the others have none):
        what a weights file is checked against before its arrays are read."""
        u, lstm = self.units, 4 * self.units  # the LSTM's four gates side by side
        return {
            "image_dense": [(self.feature_dim, u), (u,)],
            "word_embedding": [(self.vocab_size, self.embedding_dim)],
            "text_lstm": [(self.embedding_dim, lstm), (u, lstm), (lstm,)],  # input kernel, recurrent kernel, bias
            "decoder_dense": [(u, u), (u,)],
            "next_word": [(u, self.vocab_size), (self.vocab_size,)],
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {"context_length": d["max_length"], **d} if "max_length" in d else d  # folders written before the rename
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
