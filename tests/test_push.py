"""`python -m training.push` against FakeHub (tests/hub_server.py): the real huggingface_hub client, no real Hub."""

from __future__ import annotations

import re

import numpy as np
import pytest
from huggingface_hub import ModelCard, constants

from captioner import Captioner
from captioner.weights import WEIGHTS_FILE
from tests.conftest import make_weights_folder
from tests.hub_server import FakeHub
from training import push

REPO = "tester/flickr8k-captioner"
REVISION_LINE = re.compile(rf"CAPTIONER_REPO={REPO} CAPTIONER_REVISION=([0-9a-f]{{40}}) python app.py")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as hub:
        hub.patch_env(monkeypatch, cache_dir=tmp_path / "hf-cache")  # also sets a fake HF_TOKEN
        yield hub


@pytest.fixture
def weights(tmp_path):
    folder = make_weights_folder(tmp_path / "weights")
    (folder / "notes.txt").write_text("a file that is not part of the weights\n")
    return folder


def pushed_commit(capsys) -> str:
    match = REVISION_LINE.search(capsys.readouterr().out)
    assert match, "push printed no CAPTIONER_REVISION line"
    return match.group(1)


def test_push_round_trip_gives_the_same_captions(hub, weights, example_images, capsys):
    assert push.main(["--weights", str(weights), "--repo", REPO, "--message", "First weights"]) == 0
    commit = pushed_commit(capsys)
    assert hub.head(REPO) == commit and hub.log(REPO)[0] == (commit, "First weights")
    assert set(hub.files(REPO, commit)) == {".gitattributes", "README.md", "config.json", "vocab.json", WEIGHTS_FILE}
    card = ModelCard(hub.files(REPO, commit)["README.md"].decode())
    assert card.content.startswith("---\n")
    assert card.data.library_name == "keras" and "image-captioning" in card.data.tags
    assert f'Captioner.from_pretrained("{REPO}"' in card.text

    local = Captioner.from_pretrained(weights)
    remote = Captioner.from_pretrained(REPO, revision=commit)
    assert remote.weights.revision == commit
    for method in ("greedy", "beam"):
        expected = [c.candidates for c in local.caption_batch(example_images, method=method, beam_width=3)]
        assert [c.candidates for c in remote.caption_batch(example_images, method=method, beam_width=3)] == expected


def test_a_new_push_is_a_new_commit_and_the_old_one_stays_loadable(hub, weights, tmp_path, capsys):
    assert push.main(["--weights", str(weights), "--repo", REPO]) == 0
    first = pushed_commit(capsys)
    retrained = make_weights_folder(tmp_path / "retrained", seed=1)
    assert push.main(["--weights", str(retrained), "--repo", REPO]) == 0
    second = pushed_commit(capsys)
    assert second != first and hub.head(REPO) == second
    old, new = Captioner.from_pretrained(REPO, revision=first), Captioner.from_pretrained(REPO, revision=second)
    output_kernel = lambda captioner: captioner.model.get_layer("next_word").get_weights()[0]  # noqa: E731
    assert not np.array_equal(output_kernel(old), output_kernel(new))


def test_a_tampered_folder_is_refused_before_anything_is_sent(hub, weights, capsys):
    path = weights / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert push.main(["--weights", str(weights), "--repo", REPO]) == 1
    assert "Refusing to push" in capsys.readouterr().err
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "tester/has space", "a/b/c"])
def test_a_bad_repo_id_is_refused(hub, weights, repo_id, capsys):
    assert push.main(["--weights", str(weights), "--repo", repo_id]) == 1
    assert "is not a valid Hub repo id" in capsys.readouterr().err
    assert hub.requests == []


def test_no_token_is_explained(hub, weights, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # ignore a developer's login
    assert push.main(["--weights", str(weights), "--repo", REPO]) == 1
    assert "hf auth login" in capsys.readouterr().err
    assert hub.requests == []


def test_an_unreachable_hub_is_explained(hub, weights, capsys):
    hub.set_offline(True)
    assert push.main(["--weights", str(weights), "--repo", REPO]) == 1
    assert "Can't reach the Hugging Face Hub" in capsys.readouterr().err
