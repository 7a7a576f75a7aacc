"""Exercise tests/hub_server.py through the real huggingface_hub client (and document how the client behaves)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import INITIAL_GITATTRIBUTES, FakeHub

REPO = "tester/captioner"
FILES = {
    "config.json": b'{"units": 256}',
    "weights/decoder.h5": bytes(range(256)) * 64,  # binary, not valid UTF-8
    "README.md": b"---\nlicense: mit\n---\n# Captioner\n",
}


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as hub:
        hub.patch_env(monkeypatch)
        yield hub


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def read_snapshot(snapshot: str) -> dict[str, bytes]:
    return {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in Path(snapshot).rglob("*") if p.is_file()}


def test_upload_folder_then_download_each_commit(hub, tmp_path, cache):
    api = HfApi(endpoint=hub.endpoint, token="any")
    api.create_repo(REPO, exist_ok=True, private=True)
    api.create_repo(REPO, exist_ok=True)  # already exists: accepted
    folder = write_folder(tmp_path / "export", FILES)

    first = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v1")
    assert re.fullmatch(r"[0-9a-f]{40}", first.oid)
    assert hub.head(REPO) == first.oid
    (folder / "config.json").write_bytes(b'{"units": 512}')
    second = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v2")
    assert second.oid not in (first.oid, None)

    # Like the real Hub, the repo starts with a .gitattributes commit.
    assert read_snapshot(snapshot_download(REPO, revision=first.oid, cache_dir=cache)) == {
        **FILES,
        ".gitattributes": INITIAL_GITATTRIBUTES,
    }
    latest = snapshot_download(REPO, cache_dir=cache, allow_patterns="*.json")
    assert read_snapshot(latest) == {"config.json": b'{"units": 512}'}
    assert Path(latest).name == second.oid
    old_config = hf_hub_download(REPO, "config.json", revision=first.oid, cache_dir=cache)
    assert Path(old_config).read_bytes() == FILES["config.json"]

    # Like the real Hub, re-uploading unchanged files creates no commit.
    assert api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v3").oid == second.oid
    assert [message for _, message in hub.log(REPO)] == ["v2", "v1", "initial commit"]


def test_patch_env_makes_defaults_use_the_fake(hub, tmp_path, cache, monkeypatch):
    hub.patch_env(monkeypatch, cache_dir=cache)
    huggingface_hub.create_repo(REPO)
    folder = write_folder(tmp_path / "export", FILES)
    commit = huggingface_hub.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v1")
    assert hub.files(REPO, commit.oid) == {**FILES, ".gitattributes": INITIAL_GITATTRIBUTES}
    assert huggingface_hub.model_info(REPO).sha == commit.oid
    weights = hf_hub_download(REPO, "weights/decoder.h5")
    assert Path(weights).is_relative_to(cache)
    assert Path(weights).read_bytes() == FILES["weights/decoder.h5"]


def test_upload_folder_delete_patterns(hub, tmp_path):
    hub.add_commit(REPO, {"old/a.bin": b"a", "old/b.bin": b"b", "keep.txt": b"k"})
    folder = write_folder(tmp_path / "export", {"new.txt": b"n"})
    HfApi().upload_folder(repo_id=REPO, folder_path=folder, commit_message="swap", delete_patterns="old/*")
    assert set(hub.files(REPO)) == {".gitattributes", "keep.txt", "new.txt"}


def test_push_errors(hub, tmp_path):
    folder = write_folder(tmp_path / "export", FILES)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().upload_folder(repo_id="tester/missing", folder_path=folder, commit_message="v1")

    stale = hub.add_commit(REPO, {"a.txt": b"a"})
    hub.add_commit(REPO, {"b.txt": b"b"})
    with pytest.raises(HfHubHTTPError) as error:
        HfApi().upload_folder(repo_id=REPO, folder_path=folder, commit_message="v1", parent_commit=stale)
    assert error.value.response.status_code == 412


@pytest.mark.parametrize(
    ("download", "error"),
    [
        pytest.param(
            lambda cache: snapshot_download("tester/missing", cache_dir=cache),
            RepositoryNotFoundError,
            id="snapshot-unknown-repo",
        ),
        pytest.param(
            lambda cache: hf_hub_download("tester/missing", "config.json", cache_dir=cache),
            RepositoryNotFoundError,
            id="file-unknown-repo",
        ),
        pytest.param(
            lambda cache: snapshot_download(REPO, revision="no-such-branch", cache_dir=cache),
            RevisionNotFoundError,
            id="snapshot-unknown-branch",
        ),
        pytest.param(
            lambda cache: snapshot_download(REPO, revision="0" * 40, cache_dir=cache),
            RevisionNotFoundError,
            id="snapshot-unknown-commit",
        ),
        pytest.param(
            lambda cache: hf_hub_download(REPO, "config.json", revision="v9", cache_dir=cache),
            RevisionNotFoundError,
            id="file-unknown-branch",
        ),
        pytest.param(
            lambda cache: hf_hub_download(REPO, "missing.json", cache_dir=cache),
            EntryNotFoundError,
            id="unknown-file",
        ),
    ],
)
def test_missing_things_raise_hub_errors(hub, cache, download, error):
    hub.add_commit(REPO, FILES)
    with pytest.raises(error):
        download(cache)


def test_offline_mode_reads_from_cache(hub, cache, monkeypatch):
    sha = hub.add_commit(REPO, FILES)
    snapshot = snapshot_download(REPO, cache_dir=cache)
    hub.requests.clear()

    # HF_HUB_OFFLINE is read at import time: patch the constant the client checks on each request.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download(REPO, cache_dir=cache) == snapshot  # branch, resolved through refs/main
    assert snapshot_download(REPO, revision=sha, cache_dir=cache) == snapshot
    assert hf_hub_download(REPO, "config.json", cache_dir=cache) == os.path.join(snapshot, "config.json")
    assert hub.requests == []
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("tester/never-downloaded", cache_dir=cache)


def test_offline_partial_snapshot_is_reported(hub, cache, monkeypatch):
    hub.add_commit(REPO, FILES)
    snapshot_download(REPO, cache_dir=cache, allow_patterns="*.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert read_snapshot(snapshot_download(REPO, cache_dir=cache, allow_patterns="*.json")) == {
        "config.json": FILES["config.json"]
    }
    # The tree listing cached by the first download tells the client that files are missing.
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download(REPO, cache_dir=cache)


def test_unreachable_hub_falls_back_to_cache(hub, cache):
    hub.add_commit(REPO, FILES)
    snapshot = snapshot_download(REPO, cache_dir=cache)

    hub.set_offline(True)  # connections refused: httpx2.ConnectError, swallowed by the client
    assert snapshot_download(REPO, cache_dir=cache) == snapshot
    assert hf_hub_download(REPO, "config.json", cache_dir=cache) == os.path.join(snapshot, "config.json")
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("tester/never-downloaded", cache_dir=cache)

    hub.set_offline(False)  # same endpoint, same state
    sha = hub.add_commit(REPO, {"config.json": b"{}"})
    assert Path(snapshot_download(REPO, cache_dir=cache)).name == sha


def test_tampered_downloads(hub, tmp_path):
    hub.add_commit(REPO, FILES)
    original = FILES["weights/decoder.h5"]

    hub.tamper(REPO, "weights/decoder.h5", original[:100])
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, "weights/decoder.h5", cache_dir=tmp_path / "truncated")

    # Same size, different bytes: the client does not hash regular files, so corruption goes unnoticed.
    hub.tamper(REPO, "weights/decoder.h5", bytes(len(original)))
    path = hf_hub_download(REPO, "weights/decoder.h5", cache_dir=tmp_path / "corrupted")
    assert Path(path).read_bytes() == bytes(len(original))


def test_subprocess_uses_hf_endpoint(hub, cache):
    sha = hub.add_commit(REPO, FILES)
    script = "import huggingface_hub, sys; print(huggingface_hub.snapshot_download(sys.argv[1]))"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script, REPO], env=env, capture_output=True, text=True, check=True)
    assert Path(result.stdout.strip()).name == sha
