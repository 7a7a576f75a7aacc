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

from dataclasses import asdict, dataclass, fields
import numpy as np

from .lazy import keras, layers  # imported on first use: serving decodes without Keras


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
