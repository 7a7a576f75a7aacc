"""An in-memory fake of the Hugging Face Hub HTTP API, served locally for tests.

``FakeHub`` runs a standard-library ``ThreadingHTTPServer`` on 127.0.0.1 (random free port) in a
background thread. It implements the part of the Hub API that ``huggingface_hub`` 2.4.0 calls for model
repos, so the *real* client code runs against it unchanged::

    from tests.hub_server import FakeHub

    with FakeHub() as hub:                      # hub.endpoint == "http://127.0.0.1:<port>"
        hub.patch_env(monkeypatch)              # see "Pointing huggingface_hub at it" below
        api = HfApi(endpoint=hub.endpoint, token="any")
        api.create_repo("user/repo", exist_ok=True)
        info = api.upload_folder(repo_id="user/repo", folder_path=folder, commit_message="v1")
        snapshot_download("user/repo", revision=info.oid, cache_dir=tmp_path)

Endpoints (what the client sends was read from the 2.4.0 sources, not guessed):

* ``POST /api/repos/create``                     ``create_repo`` (409 if it exists; ``exist_ok`` handles it).
* ``POST /api/validate-yaml``                    sent by uploads containing a ``README.md``; always valid.
* ``POST /api/models/{repo}/preupload/{rev}``    answers ``uploadMode: "regular"`` for every file, so
  ``upload_folder`` sends all contents base64-encoded in the commit payload and never uploads through
  LFS/Xet (even with ``hf_xet`` installed: its pipeline only uploads files the server marks "lfs").
* ``POST /api/models/{repo}/commit/{branch}``    the ndjson commit (``file``, ``deletedFile``,
  ``deletedFolder`` operations; ``parentCommit`` is checked).
* ``GET  /api/models/{repo}[/revision/{rev}]``   ``model_info``/``repo_info``: ``sha`` and ``siblings``.
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]`` ``list_repo_tree``/``list_repo_files`` (one page).
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``      file metadata (``X-Repo-Commit``, ``ETag`` = git blob
  sha1, ``Content-Length``) and content. No redirects.

Unknown repo / revision / file answer 404 with the Hub's ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``), which the client turns into ``RepositoryNotFoundError``,
``RevisionNotFoundError`` and ``RemoteEntryNotFoundError`` (an ``EntryNotFoundError``). Anything else
(datasets/spaces, LFS, PRs, tags, branches other than ``main``, paths-info, auth) is not implemented:
unknown routes answer a plain 404 and any token is accepted.

Data model: each commit is an immutable snapshot ``{path: bytes}`` with a random, unique 40-hex sha;
the ``main`` branch points at the latest one. Like the real Hub:

* ``create_repo`` makes an initial commit holding a ``.gitattributes`` file, so snapshots contain that
  file in addition to what was uploaded;
* preupload reports the blob id of files already on the branch, so re-uploading unchanged files creates
  no commit (``upload_folder`` then returns the current head as ``CommitInfo.oid``).

Test hooks:

* ``hub.add_commit(repo_id, {path: bytes})`` seeds files (creating the repo if needed) and returns the
  commit sha. Files are merged into the previous snapshot, exactly like an upload.
* ``hub.files(repo_id, revision)``, ``hub.head(repo_id)`` and ``hub.log(repo_id)`` (``(sha, message)``
  pairs, newest first) inspect what was pushed.
* ``hub.set_offline(True)`` (same as ``hub.stop()``) closes the listening socket: the client gets
  "connection refused" (``httpx2.ConnectError``), i.e. a real network failure. The server speaks HTTP/1.0
  so that no keep-alive connection outlives it. ``hub.set_offline(False)`` (``hub.start()``) listens
  again on the same port with the same state.
* ``hub.tamper(repo_id, path, data)`` makes ``GET`` of that file (at the commit ``main`` points to when
  called) return ``data`` while ``HEAD``, the tree and model info still advertise the original ETag and
  size. With the 2.4.0 client, a different length makes the download fail with
  ``OSError("Consistency check failed: ...")`` (no retry); the same length is accepted silently and the
  corrupted bytes land in the cache, because the client does not hash non-LFS downloads.
* ``hub.requests`` lists every ``(method, path)`` served, e.g. to assert that a cached read did not
  touch the network.

Pointing huggingface_hub at it:

* Explicitly: ``HfApi(endpoint=hub.endpoint, ...)``; ``snapshot_download(..., endpoint=hub.endpoint)``.
* Implicitly, in-process: ``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import time, into
  ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, and the module-level helpers
  (``huggingface_hub.create_repo``, ``upload_folder``, ...) are bound to an ``HfApi`` instance created at
  import time. ``hub.patch_env(monkeypatch, cache_dir=None)`` patches all of these (plus a fake
  ``HF_TOKEN``, and optionally ``HF_HUB_CACHE``), so code calling ``snapshot_download(repo_id)`` with
  no ``endpoint`` hits the fake. (The client also fetches ``/api/agent-harnesses`` from
  ``constants.ENDPOINT`` once per process; the fake answers 404, which the client ignores.)
* In a subprocess: set ``HF_ENDPOINT=hub.endpoint`` (and ``HF_HUB_CACHE``) in its environment.

Offline mode: ``HF_HUB_OFFLINE`` is also read once at import time into ``constants.HF_HUB_OFFLINE``,
which the client then checks on every request; in-process tests use
``monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)``.

How huggingface_hub 2.4.0 behaves against failures (see tests/test_hub_server.py):

* Hub unreachable or ``HF_HUB_OFFLINE``: ``snapshot_download`` and ``hf_hub_download`` return the cached
  snapshot/file for a branch (via ``refs/<branch>``) or a commit sha, without raising; with nothing
  cached they raise ``LocalEntryNotFoundError``. A cached snapshot missing requested files (e.g. first
  downloaded with ``allow_patterns``) raises ``IncompleteSnapshotError`` instead.
* Slow path to avoid in tests: with the server stopped, ``hf_hub_download`` of a file that is *not*
  cached, and ``snapshot_download`` of a commit sha whose tree listing is not cached, retry with
  exponential backoff (about 23 s) before giving up.
"""

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# A trimmed version of the `.gitattributes` the Hub puts in the initial commit of every new repo.
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    b"*.npy filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"  # "namespace/name", or a legacy un-namespaced "name"
# (methods, path pattern, _Handler method). Matched in order against the raw (still %-encoded) path.
_ROUTES = [
    (("POST",), re.compile(r"/api/repos/create"), "_create_repo"),
    (("POST",), re.compile(r"/api/validate-yaml"), "_validate_yaml"),
    (("GET",), re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "_model_info"),
    (("GET",), re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "_tree"),
    (("POST",), re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "_preupload"),
    (("POST",), re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "_commit"),
    (("GET", "HEAD"), re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "_resolve"),
]


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ETag and ``oid`` of non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer of the fake Hub: HTTP status, ``X-Error-Code`` and extra headers."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if error_code is not None:
            self.headers["X-Error-Code"] = error_code


@dataclass(frozen=True)
class _Commit:
    parent: str | None
    message: str
    files: dict[str, bytes]  # the full snapshot, never mutated


@dataclass
class _Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)  # commit sha -> commit


class FakeHub:
    """In-memory model repos served over HTTP. See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._tampered: dict[tuple[str, str, str], bytes] = {}  # (repo_id, commit sha, path) -> served bytes
        self._server: "_Server | None" = None
        self._thread: threading.Thread | None = None
        self._port = 0  # 0 until the first start() picks a free port, then reused by later starts
        self.requests: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        if self._port == 0:
            raise RuntimeError("FakeHub has not been started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> "FakeHub":
        if self._server is None:
            self._server = _Server(("127.0.0.1", self._port), self)
            self._port = self._server.server_address[1]
            # A short poll interval keeps stop() (which waits for the serving loop) fast.
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def set_offline(self, offline: bool) -> None:
        """Simulate the network going down (connections refused) or coming back on the same endpoint."""
        if offline:
            self.stop()
        else:
            self.start()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def patch_env(self, monkeypatch, cache_dir=None) -> None:
        """Make the already-imported ``huggingface_hub`` use this server by default (undone by ``monkeypatch``).

        If ``cache_dir`` is given, it also becomes the default download cache (``scan_cache_dir`` excepted:
        it captured ``HF_HUB_CACHE`` at import time, pass it ``cache_dir`` explicitly).
        """
        from huggingface_hub import constants, hf_api

        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)  # for subprocesses started by the test
        # Pushes need a token; a fake one also guarantees a developer's real token is never sent.
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)  # behind huggingface_hub.create_repo & co
        if cache_dir is not None:
            monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))

    # ------------------------------------------------------------------ test hooks

    def add_commit(self, repo_id: str, files: dict[str, bytes], message: str = "Seed files") -> str:
        """Commit ``files`` on top of ``main`` (creating the repo if needed) and return the commit sha."""
        with self._lock:
            self._create_repo(repo_id)
            return self._commit(repo_id, "main", message, additions=files)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self._lookup(repo_id, branch)[0]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self._lookup(repo_id, revision)[1])

    def log(self, repo_id: str, revision: str = "main") -> list[tuple[str, str]]:
        """``(sha, message)`` of the commits leading to ``revision``, newest first."""
        with self._lock:
            sha: str | None = self._lookup(repo_id, revision)[0]
            history = []
            while sha is not None:
                commit = self._repos[repo_id].commits[sha]
                history.append((sha, commit.message))
                sha = commit.parent
            return history

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        """Serve ``data`` as the content of ``path`` at the current ``main`` commit, keeping its ETag and size."""
        with self._lock:
            sha, files = self._lookup(repo_id, "main")
            if path not in files:
                raise KeyError(f"{repo_id}@{sha} has no file {path!r}")
            self._tampered[(repo_id, sha, path)] = data

    # ------------------------------------------------------------------ state (used by _Handler)

    def _create_repo(self, repo_id: str) -> bool:
        """Create the repo with its initial commit; return False if it already existed."""
        with self._lock:
            if repo_id in self._repos:
                return False
            self._repos[repo_id] = _Repo()
            self._store_commit(repo_id, "main", "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES})
            return True

    def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        """Return (commit sha, snapshot) of a branch name or full commit sha, or raise the Hub's 404."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
            sha = repo.branches.get(revision, revision)
            if sha not in repo.commits:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return sha, repo.commits[sha].files

    def _commit(
        self,
        repo_id: str,
        branch: str,
        message: str,
        additions: dict[str, bytes],
        deletions: tuple[str, ...] | list[str] = (),
        parent_commit: str | None = None,
    ) -> str:
        """Apply a commit on ``branch``; ``deletions`` are file paths, or folder paths ending with "/"."""
        with self._lock:
            head, files = self._lookup(repo_id, branch)
            if branch not in self._repos[repo_id].branches:
                raise HubError(400, f"Can only commit to a branch, not to {branch}")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head})")
            snapshot = dict(files)
            for path in deletions:
                if path.endswith("/"):
                    snapshot = {p: data for p, data in snapshot.items() if not p.startswith(path)}
                elif snapshot.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            snapshot.update(additions)
            return self._store_commit(repo_id, branch, message, snapshot)

    def _store_commit(self, repo_id: str, branch: str, message: str, snapshot: dict[str, bytes]) -> str:
        """Store a new commit and point ``branch`` at it."""
        repo = self._repos[repo_id]
        # Random rather than derived from the content: shas must never repeat across FakeHub instances, or a
        # download cache shared between tests would serve one test's files to another. The client never
        # checks that a commit id is a real git hash.
        sha = secrets.token_hex(20)
        repo.commits[sha] = _Commit(repo.branches.get(branch), message, snapshot)
        repo.branches[branch] = sha
        return sha

    def _served_bytes(self, repo_id: str, sha: str, path: str, data: bytes) -> bytes:
        with self._lock:
            return self._tampered.get((repo_id, sha, path), data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: FakeHub):
        super().__init__(address, _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes the connection after each response: the client never keeps a pooled connection
    # to a handler thread, so FakeHub.stop() really makes the Hub unreachable.
    protocol_version = "HTTP/1.0"
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args) -> None:
        pass  # keep test output clean; FakeHub.requests records the traffic instead

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        # Read the whole body before answering, even with an error: closing a socket that still holds unread
        # data makes the kernel reset the connection, and the client would see that instead of the answer.
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            for methods, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in methods:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    getattr(self, name)(**args)
                    return
            raise HubError(404, f"FakeHub does not implement {self.command} {url.path}")
        except HubError as error:
            self._send_json({"error": error.message}, error.status, {"X-Error-Message": error.message, **error.headers})

    def _read_json(self):
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        """Send a response; for HEAD, only the headers (``Content-Length`` still describes ``body``)."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self) -> None:
        payload = self._read_json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "FakeHub only supports model repos")
        organization, name = payload.get("organization"), payload["name"]
        repo_id = f"{organization}/{name}" if organization else name
        url = f"{self.hub.endpoint}/{repo_id}"
        if self.hub._create_repo(repo_id):
            self._send_json({"url": url, "name": repo_id})
        else:
            # With exist_ok=True the client accepts the 409 but still reads "url" from its body.
            message = "You already created this model repo"
            self._send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})

    def _validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})

    def _model_info(self, repo: str, rev: str = "main") -> None:
        sha, files = self.hub._lookup(repo, rev)
        siblings = [
            {"rfilename": path, "size": len(data), "blobId": git_blob_sha(data)} for path, data in sorted(files.items())
        ]
        self._send_json({"id": repo, "modelId": repo, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, repo: str, rev: str, path: str = "") -> None:
        _, files = self.hub._lookup(repo, rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path else ""
        entries: dict[str, dict] = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            # The folders leading to the file (only the first level when not recursive).
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                folder_id = hashlib.sha1(folder.encode()).hexdigest()
                entries[folder] = {"type": "directory", "oid": folder_id, "size": 0, "path": folder}
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": file_path}
        if path and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send_json(list(entries.values()))

    def _preupload(self, repo: str, rev: str) -> None:
        _, files = self.hub._lookup(repo, rev)
        requested = self._read_json()["files"]
        self._send_json(
            {
                "files": [
                    {
                        "path": file["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        # Blob id of the current version: lets the client skip unchanged files.
                        "oid": git_blob_sha(files[file["path"]]) if file["path"] in files else None,
                    }
                    for file in requested
                ]
            }
        )

    def _commit(self, repo: str, rev: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "FakeHub does not support pull requests")
        header, *operations = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        for operation in operations:
            key, value = operation["key"], operation["value"]
            if key == "file" and value.get("encoding") == "base64":
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deletions.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"FakeHub does not support commit operation {key!r} (no LFS)")
        sha = self.hub._commit(
            repo,
            rev,
            header["value"]["summary"],
            additions,
            deletions,
            parent_commit=header["value"].get("parentCommit"),
        )
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{sha}",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        sha, files = self.hub._lookup(repo, rev)
        if path not in files:
            # The client caches the non-existence of the file under this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        body = data if self.command == "HEAD" else self.hub._served_bytes(repo, sha, path, data)
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": sha}
        self._send(200, body, headers)
