"""A complete, checksummed weights folder with a random decoder (and a random encoder): the real file
formats and code paths with nothing to train or download. Tests and benchmarks use it."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from captioner.encoder import ENCODERS
from captioner.model import ModelConfig, build_caption_model
from captioner.vocabulary import Vocabulary
from captioner.weights import VOCAB_FILE, WEIGHTS_FILE, write_config


def write_random_weights(folder: str | Path, encoder: str = "mobilenet_v2", words: list[str] | None = None,
                         units: int = 256, context_length: int = 38, seed: int = 0) -> Path:
    """Write the folder and return it.

    words: the vocabulary (default: 1,560 made-up words, the bundled model's size).
    """
    keras.utils.set_random_seed(seed)
    vocab = Vocabulary(words if words is not None else (f"word{i:04d}" for i in range(1560)))
    config = ModelConfig(encoder=encoder, vocab_size=len(vocab), context_length=context_length,
                         feature_dim=ENCODERS[encoder].feature_dim, units=units)
    model = build_caption_model(config, np.random.default_rng(seed).normal(size=(len(vocab), 50)).astype("float32"))
    # A random decoder spreads its probability thinly; sharper logits make its captions depend on the image.
    kernel, bias = model.get_layer("next_word").get_weights()
    model.get_layer("next_word").set_weights([kernel * 8.0, bias])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab.save(folder / VOCAB_FILE)
    model.save_weights(folder / WEIGHTS_FILE)
    write_config(folder, config, encoder_weights="random")
    return folder
