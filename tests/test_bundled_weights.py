"""End to end with the trained model this repository ships in weights/."""

import json

import pytest

from captioner import Captioner
from captioner.weights import BUNDLED_WEIGHTS, read_folder
from tests.conftest import FLICKR8K

pytestmark = pytest.mark.skipif(not (BUNDLED_WEIGHTS / "config.json").is_file(), reason="no trained weights in weights/")


@pytest.fixture(scope="module")
def bundled():
    return Captioner.from_pretrained(str(BUNDLED_WEIGHTS))


def test_the_folder_is_complete_and_its_checksums_match():
    folder = read_folder(BUNDLED_WEIGHTS)
    assert (folder.config.encoder, folder.config.feature_dim, folder.encoder_weights) == ("efficientnet_lite0", 1280, "imagenet")
    assert (folder.config.units, folder.config.embedding_dim, folder.config.dropout) == (256, 50, 0.3)
    # The encoder's converted ImageNet weights travel with the folder: nothing is downloaded for them.
    for name in ("encoder.weights.h5", "metrics.json", "metrics.md", "history.png", "history.json", "README.md"):
        assert (BUNDLED_WEIGHTS / name).is_file(), name
    # ...and the encoder as the OpenVINO model serving runs (int8), each file under the Hub's 10 MiB rule.
    assert folder.encoder_ir == BUNDLED_WEIGHTS / "encoder.xml"
    assert all((BUNDLED_WEIGHTS / name).stat().st_size < 10 * 2**20 for name in ("encoder.xml", "encoder.bin"))


def test_its_recorded_scores_meet_the_targets():
    metrics = json.loads((BUNDLED_WEIGHTS / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 1000
    best = metrics["results"][metrics["best"]]  # the app's default decoding
    assert best["BLEU-4"] >= 0.21 and best["CIDEr"] >= 0.55


def test_the_default_captioner_is_the_bundled_model(monkeypatch):
    monkeypatch.delenv("CAPTIONER_REPO", raising=False)
    assert Captioner.from_pretrained().weights.path == BUNDLED_WEIGHTS


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_it_names_what_is_in_the_example_photos(bundled, example_images, method):
    captions = {path.stem: c.text for path, c in zip(example_images, bundled.caption_batch(example_images, method=method))}
    assert all(4 <= len(text.split()) <= 25 for text in captions.values()), captions
    assert "dog" in captions["dog"], captions["dog"]
    assert len(set(captions.values())) >= len(captions) - 1  # it looks at the photo: captions differ


@pytest.mark.skipif(not (FLICKR8K / "originals").is_dir(), reason="needs ../shared/flickr8k/originals")
def test_full_size_test_photos_get_captions_that_share_words_with_their_references(bundled):
    from training.flickr8k import read_captions, read_split

    test_images = set(read_split(FLICKR8K, "test"))
    references = read_captions(FLICKR8K)
    photos = sorted(p for p in (FLICKR8K / "originals").glob("*.jpg") if p.name in test_images)
    assert photos
    captions = [c.text for c in bundled.caption_batch(photos, method="beam", beam_width=5, length_penalty=2.0)]

    def overlap(caption, photo):  # share of the caption's content words that people describing the photo used
        words = set(caption.split()) - {"a", "an", "the", "is", "are", "in", "on", "of", "with", "and", "at"}
        return len(words & {w for ref in references[photo.name] for w in ref.lower().split()}) / max(len(words), 1)

    own = sum(overlap(c, p) for c, p in zip(captions, photos)) / len(photos)
    other = sum(overlap(c, p) for c, p in zip(captions, photos[1:] + photos[:1])) / len(photos)  # someone else's photo
    assert own >= 0.3 and own >= other + 0.1, (own, other, captions)
