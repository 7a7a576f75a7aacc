"""Shared fixtures: tiny randomly initialised weights folders, built with the real code paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from captioner.model import ModelConfig, build_caption_model
from captioner.vocabulary import Vocabulary
from captioner.weights import VOCAB_FILE, WEIGHTS_FILE, write_config

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FLICKR8K = SHARED / "flickr8k"
EXAMPLES = ROOT / "examples"
TINY_WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "man", "red", "blue", "ball", "in", "water", "is", "with"]


def make_weights_folder(folder: Path, encoder: str = "mobilenet_v2", feature_dim: int = 1280, seed: int = 0,
                        words=TINY_WORDS, units: int = 32, max_length: int = 12) -> Path:
    """A complete, checksummed weights folder with random decoder weights and a random encoder."""
    keras.utils.set_random_seed(seed)
    vocab = Vocabulary(words)
    config = ModelConfig(encoder=encoder, vocab_size=len(vocab), max_length=max_length, feature_dim=feature_dim, units=units)
    model = build_caption_model(config, np.random.default_rng(seed).normal(size=(len(vocab), 50)).astype("float32"))
    # Random decoders put almost all their mass on a few words; sharper logits make captions vary by image.
    kernel, bias = model.get_layer("next_word").get_weights()
    model.get_layer("next_word").set_weights([kernel * 8.0, bias])
    folder.mkdir(parents=True, exist_ok=True)
    vocab.save(folder / VOCAB_FILE)
    model.save_weights(folder / WEIGHTS_FILE)
    write_config(folder, config, encoder_weights="random")
    return folder


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny MobileNetV2-encoder weights folder (random weights); tests must not modify it."""
    return make_weights_folder(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture
def tiny_weights_copy(tiny_weights, tmp_path) -> Path:
    """A private copy a test may tamper with."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "weights"))


@pytest.fixture(scope="session")
def tiny_captioner(tiny_weights):
    from captioner import Captioner

    return Captioner.from_pretrained(tiny_weights)


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
