"""Loading weights from a Hugging Face Hub repo, against a local server that speaks the Hub's API."""

from pathlib import Path

import huggingface_hub
import pytest

from captioner import Captioner, WeightsError
from captioner.weights import WEIGHTS_FILE
from tests.hub_server import FakeHub

REPO = "someone/captioner"


@pytest.fixture
def hub(monkeypatch, tmp_path, tiny_weights):
    with FakeHub() as server:
        server.patch_env(monkeypatch, cache_dir=tmp_path / "hf-cache")
        server.commit = server.add_commit(REPO, {p.name: p.read_bytes() for p in Path(tiny_weights).iterdir()})
        yield server


def captions(captioner, images):
    return [(c.text, c.candidates) for c in captioner.caption_batch(images, method="beam", beam_width=3)]


def test_a_pinned_revision_gives_the_same_captions_as_the_local_folder(hub, tiny_captioner, example_images):
    captioner = Captioner.from_pretrained(REPO, revision=hub.commit)
    assert captions(captioner, example_images[:3]) == captions(tiny_captioner, example_images[:3])
    assert captioner.weights.revision == hub.commit
    assert captioner.description["source"] == f"Hub {REPO}@{hub.commit[:10]}"


def test_the_default_captioner_follows_captioner_repo_and_revision(hub, monkeypatch):
    first = hub.commit
    hub.add_commit(REPO, {"metrics.json": b'{"best": "greedy", "results": {}}'})
    monkeypatch.setenv("CAPTIONER_REPO", REPO)
    monkeypatch.setenv("CAPTIONER_REVISION", first)
    assert Captioner.from_pretrained().weights.revision == first
    monkeypatch.delenv("CAPTIONER_REVISION")
    assert Captioner.from_pretrained().weights.revision == hub.head(REPO)  # main


def test_offline_mode_and_a_dead_network_use_the_cache(hub, monkeypatch, tiny_captioner, example_images):
    Captioner.from_pretrained(REPO, revision=hub.commit)  # fills the cache

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    served = len(hub.requests)
    offline = Captioner.from_pretrained(REPO, revision=hub.commit)
    assert len(hub.requests) == served  # not a single request
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    hub.set_offline(True)  # connection refused
    unreachable = Captioner.from_pretrained(REPO, revision=hub.commit)
    assert captions(offline, example_images[:2]) == captions(unreachable, example_images[:2]) == captions(tiny_captioner, example_images[:2])


def test_offline_with_an_empty_cache_says_so(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="offline mode"):
        Captioner.from_pretrained(REPO)


def test_an_unreachable_hub_with_an_empty_cache_says_so(hub):
    hub.set_offline(True)
    with pytest.raises(WeightsError, match="can't be reached"):
        Captioner.from_pretrained(REPO)


def test_missing_repos_and_revisions_are_explained(hub):
    with pytest.raises(WeightsError, match="does not exist"):
        Captioner.from_pretrained("nobody/nothing")
    with pytest.raises(WeightsError, match="has no revision 'v9'"):
        Captioner.from_pretrained(REPO, revision="v9")


def test_tampered_and_partial_downloads_are_refused(hub):
    original = hub.files(REPO, hub.commit)[WEIGHTS_FILE]
    corrupted = bytearray(original)
    corrupted[len(corrupted) // 2] ^= 0xFF
    hub.tamper(REPO, WEIGHTS_FILE, bytes(corrupted))  # same size: only our checksum can tell
    with pytest.raises(WeightsError, match="does not match the checksum"):
        Captioner.from_pretrained(REPO)


def test_a_partial_download_is_refused(hub):
    hub.tamper(REPO, WEIGHTS_FILE, hub.files(REPO, hub.commit)[WEIGHTS_FILE][:1000])  # cut short
    with pytest.raises(WeightsError, match="failed"):
        Captioner.from_pretrained(REPO)


def test_the_default_captioner_falls_back_to_the_bundled_weights(hub, monkeypatch, tiny_weights):
    monkeypatch.setattr("captioner.inference.BUNDLED_WEIGHTS", tiny_weights)
    monkeypatch.setenv("CAPTIONER_REPO", "nobody/nothing")
    captioner = Captioner.from_pretrained()
    assert captioner.weights.path == tiny_weights
    assert "bundled weights/" in captioner.description["source"] and "does not exist" in captioner.description["source"]
