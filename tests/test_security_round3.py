"""Security, round 3 (issue 18): one client can't lock everyone out, make the app fetch URLs, or fill its disk.

Against a real `python app.py` on loopback (tiny weights, decode test hooks on, a 64 MB upload cache), over raw
HTTP. Every connection or name lookup the app makes to anything but loopback is refused and logged by
tests/outbound_guard (an audit hook loaded through PYTHONPATH), so "no route fetches a URL" is checked without
traffic leaving the machine. Clients are told apart as the Space's proxy tells them apart: X-Forwarded-For
from a trusted (loopback) peer, which uvicorn puts in the request's scope (webapp/traffic.py).
Each test is a finding of the issue (F1-F10). The tests that fill the upload cache for good run last.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import app
from benchmarks.app_process import app_process, event_result, free_port
from captioner import Captioner, WeightsError
from captioner.sandbox import TEST_HOOKS, TEST_HOOKS_ENV
from tests.test_security import FILE_META, SENTENCE
from webapp import many_photos, middleware, sessions, traffic, upload_cache

GUARD = Path(__file__).resolve().parent / "outbound_guard"
CACHE_MB = 64  # the server's upload cache: small, so that filling it is quick
USER_P95_S = 2.0  # the target for a user's /caption while one client attacks (this 2-core machine: ~0.3 s)
HOSTILE_URL = "http://203.0.113.7/photo.jpg"  # TEST-NET-3; the guard refuses it anyway


@pytest.fixture(scope="module")
def outbound_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guard") / "outbound.log"


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encoder_cache")


@pytest.fixture(scope="module")
def served(tiny_weights, outbound_log, encoder_cache):
    # An empty encoder cache: the app converts its encoder at startup, which must not phone out either (OpenVINO's
    # converter reports to its telemetry host unless stopped: captioner/backends.py).
    env = {TEST_HOOKS_ENV: "1", "PYTHONPATH": os.pathsep.join([str(GUARD), os.environ.get("PYTHONPATH", "")]),
           "OUTBOUND_LOG": str(outbound_log), "CAPTIONER_UPLOAD_CACHE_MB": str(CACHE_MB),
           "CAPTIONER_CACHE": str(encoder_cache)}
    with app_process(tiny_weights, env=env) as process:
        yield process


def client(served, address: str | None = None) -> httpx.Client:
    """An httpx client on .../gradio_api, as the client `address` (None: the loopback user)."""
    headers = {"x-forwarded-for": address} if address else {}
    return httpx.Client(base_url=served.url + "/gradio_api", timeout=60, headers=headers)


@pytest.fixture(scope="module")
def user(served):
    with client(served) as http:
        yield http


@pytest.fixture(scope="module")
def photo(user) -> dict:
    return upload(user, (app.EXAMPLES_DIR / "cat.jpg").read_bytes(), "cat.jpg")


def upload(http, data: bytes, name: str = "photo.jpg") -> dict:
    response = http.post("/upload", files=[("files", (name, data))])
    assert response.status_code == 200, response.text
    return {"path": response.json()[0], "meta": FILE_META}


def caption(http, image) -> tuple[bool, float]:
    start = time.monotonic()
    response = http.post("/call/caption", json={"data": [image, "greedy"]})
    if response.status_code != 200:
        return False, time.monotonic() - start
    kind, _ = event_result(http, "caption", response.json()["event_id"])
    return kind == "complete", time.monotonic() - start


def assert_user_served(http, image, times: int = 5) -> None:
    results = [caption(http, image) for _ in range(times)]
    assert all(ok for ok, _ in results), results
    seconds = sorted(s for _, s in results)
    assert seconds[int(0.95 * (len(seconds) - 1))] < USER_P95_S, seconds


def assert_sentence(response, *statuses) -> str:
    assert response.status_code in statuses, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert SENTENCE.fullmatch(detail), detail
    return detail


def raw_request(url: str, head: str, address: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"{head}Host: {host}\r\nX-Forwarded-For: {address}\r\n\r\n".encode())
    return sock


def no_outbound(outbound_log: Path) -> None:
    assert not outbound_log.exists() or not outbound_log.read_text(), outbound_log.read_text()


def test_starting_the_app_converts_its_encoder_without_phoning_out(served, encoder_cache, outbound_log):
    assert any((encoder_cache / "openvino").iterdir())  # it did convert, in its empty cache
    no_outbound(outbound_log)


# ---- F1: bodies declared and never sent ---------------------------------------------------------------


def test_unsent_bodies_lock_no_one_out(served, user, photo):
    head = "POST /gradio_api/queue/join HTTP/1.1\r\nContent-Type: application/json\r\n"
    declared = [raw_request(served.url, head + f"Content-Length: {middleware.MAX_EVENT_BODY_BYTES}\r\n", f"198.51.100.{i}")
                for i in range(8)]  # eight clients, 225 MB declared, nothing sent
    chunked = [raw_request(served.url, head + "Transfer-Encoding: chunked\r\n", "198.51.100.99")
               for _ in range(traffic.MAX_BODIES_PER_CLIENT)]  # and one client's every slot
    try:
        time.sleep(0.3)
        extra = raw_request(served.url, head + "Content-Length: 100\r\n", "198.51.100.99")
        assert b" 429 " in extra.recv(300).split(b"\r\n")[0]  # that client's next body: refused with a sentence
        assert_user_served(user, photo)
    finally:
        for sock in [*declared, *chunked]:
            sock.close()


# ---- F3, F4: routes that fetch URLs; every route Gradio mounts ---------------------------------------------


def test_the_stream_route_carries_no_event_data(served, user, outbound_log):
    hang = upload(user, TEST_HOOKS["hang"] + b" test file", "hang.png")
    session = uuid.uuid4().hex[:12]
    joined = user.post("/queue/join", json={"data": [hang, "greedy"], "fn_index": event_index(user, "caption"),
                                            "session_hash": session})
    assert joined.status_code == 200, joined.text
    event_id = joined.json()["event_id"]  # running (or queued) for the next 3 s: the decode hangs
    for image in ({"path": HOSTILE_URL, "meta": FILE_META}, None):  # a URL to fetch; harmless data
        refused = user.post(f"/stream/{event_id}", json={"data": [image, "greedy"], "fn_index": 0, "session_hash": session})
        assert_sentence(refused, 400, 404)  # the payload's checks, then: no streaming event to send it to
    time.sleep(0.5)
    no_outbound(outbound_log)


@pytest.mark.parametrize("path", [f"/file={HOSTILE_URL}", "/file=https://example.com/x.jpg", "/file=//example.com/x",
                                  f"/file/{HOSTILE_URL}", f"/proxy={HOSTILE_URL}", "/file=HTTP://203.0.113.7/x"])
def test_no_route_fetches_a_url(user, outbound_log, path):
    start = time.monotonic()
    for method in ("GET", "HEAD"):
        response = user.request(method, path, headers={"range": "bytes=0-10"})
        assert response.status_code == 404 and time.monotonic() - start < 2, (method, response.status_code)
    assert_sentence(user.get(path), 404)
    no_outbound(outbound_log)


def event_index(http, api_name: str) -> int:
    config = httpx.get(str(http.base_url).removesuffix("/gradio_api/") + "/config", timeout=30).json()
    (index,) = [i for i, event in enumerate(config["dependencies"]) if event["api_name"] == api_name]
    return index


def mounted_routes(tiny_captioner) -> set[tuple[str, str]]:
    """Every (method, path) Gradio mounts for the app as `python app.py` launches it."""
    demo = app.build_demo(tiny_captioner)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **middleware.launch_options(demo, max_files_per_upload=app.MAX_BATCH_FILES))
    try:
        routes = set()
        for route in demo.server_app.routes:
            included = getattr(route, "original_router", None)  # FastAPI's included /gradio_api router
            for each in included.routes if included else [route]:
                routes |= {(method, each.path) for method in each.methods}
        return routes
    finally:
        demo.close()


def test_every_route_gradio_mounts_has_a_policy_and_withstands_hostile_input(tiny_captioner, served, user, outbound_log):
    # A Gradio upgrade that adds (or renames) a route fails here: list it in middleware.ROUTES with what it may do.
    assert mounted_routes(tiny_captioner) == set(middleware.ROUTES)
    secret = "../" * 8 + "etc/passwd"
    body = {"data": [{"path": HOSTILE_URL, "url": HOSTILE_URL, "meta": FILE_META}, HOSTILE_URL], "fn_index": 0,
            "session_hash": "x", "url": HOSTILE_URL, "event_id": "x", "fn_name": "x", "component_id": 1}
    for (method, template), policy in sorted(middleware.ROUTES.items()):
        for value in (HOSTILE_URL, secret):
            path = template
            while "{" in path:
                start, end = path.index("{"), path.index("}")
                path = path[:start] + value + path[end + 1:]
            path = path.removeprefix("/gradio_api")
            base = "" if template.startswith("/gradio_api") else str(user.base_url).removesuffix("/gradio_api/")
            try:
                with user.stream(method, base + path, json=body if method == "POST" else None, timeout=5) as response:
                    status = response.status_code
                    text = response.read()[:100_000].decode(errors="replace") if status != 200 or policy != "page" else ""
            except httpx.ReadTimeout:  # an event stream waiting for events: it sent its headers, and nothing else
                continue
            where = (method, template, value, status)
            assert status < 500, where
            assert "root:" not in text, where
            if policy == middleware.REFUSED:
                assert status == 404 and (method == "HEAD" or SENTENCE.fullmatch(json.loads(text)["detail"])), where
    time.sleep(0.5)
    no_outbound(outbound_log)
    assert_user_served(user, upload(user, (app.EXAMPLES_DIR / "dog.jpg").read_bytes()), times=2)


# ---- F6: the files-per-upload limit and ambiguous multipart headers ------------------------------------------


@pytest.mark.parametrize("content_type", ["multipart/form-data; BOUNDARY=xyz", "multipart/form-data; boundary=abc; boundary=xyz",
                                          'multipart/form-data; boundary="x\\"yz"', 'multipart/form-data; boundary="xyz"'])
def test_ambiguous_multipart_headers_are_refused(served, user, content_type):
    boundary = "xyz" if "x\\" not in content_type else 'x"yz'
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\nxxxx\r\n")
    body = (part * (app.MAX_BATCH_FILES + 10) + f"--{boundary}--\r\n").encode()
    before = sum(1 for _ in served.upload_dir.rglob("*"))
    response = user.post("/upload", content=body, headers={"content-type": content_type})
    assert response.status_code in (400, 413), (content_type, response.text[:200])
    assert_sentence(response, 400, 413)
    time.sleep(0.2)
    assert sum(1 for _ in served.upload_dir.rglob("*")) == before  # nothing stored


# ---- F8: inline images at a predictable path ------------------------------------------------------------


def test_inline_images_are_stored_under_unpredictable_names(served, user):
    data = (app.EXAMPLES_DIR / "dog.jpg").read_bytes()
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    response = user.post("/call/caption", json={"data": [{"path": None, "url": url}, "greedy"]})
    assert response.status_code == 200 and event_result(user, "caption", response.json()["event_id"])[0] == "complete"
    guessed = served.upload_dir / hashlib.sha256(data).hexdigest() / "inline-image"
    assert user.get(f"/file={guessed}").status_code in (403, 404)
    stored = [p for p in served.upload_dir.rglob("inline-image") if p.read_bytes() == data]
    assert stored and all(len(p.parent.name) == 32 and p != guessed for p in stored)


# ---- F9: absurd model configs -----------------------------------------------------------------------------


def absurd_copy(tiny_weights: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(tiny_weights, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["units"] = 16384  # a 5 GB decoder
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_absurd_model_configs_get_a_sentence(tiny_weights, tmp_path):
    with app_process(absurd_copy(tiny_weights, tmp_path / "absurd")) as process:
        page = httpx.get(process.url + "/config", timeout=30).text
        rss = __import__("psutil").Process(process.process.pid).memory_info().rss
    assert "units must be a whole number from 1 to 2,048, not 16384" in page and app.NOT_LOADED in page
    assert rss < 2e9  # nothing allocated for it


def test_absurd_hub_configs_fall_back_to_the_bundled_weights(tiny_weights, tmp_path, monkeypatch):
    from captioner import inference, weights

    absurd = absurd_copy(tiny_weights, tmp_path / "absurd")
    with pytest.raises(WeightsError, match="units must be a whole number"):
        weights.read_folder(absurd)
    monkeypatch.setenv("CAPTIONER_REPO", "user/absurd")  # as if the Hub repo held it
    monkeypatch.setattr(inference, "download_from_hub", lambda repo, revision=None: weights.read_folder(absurd))
    source = Captioner.from_pretrained().description["source"]
    assert source.startswith("bundled weights/") and "units must be a whole number" in source


# ---- F10, F7: the CSV guard, word=True, what sessions keep ----------------------------------------------------


def test_spreadsheet_formulas_after_spaces_are_written_as_text():
    results = [many_photos.PhotoResult(name) for name in [" =1+1", "\t=1", "  @SUM(A1)", "-2", "ok.jpg"]]
    rows = many_photos.results_csv(results).splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["' =1+1", "'\t=1", "'  @SUM(A1)", "'-2", "ok.jpg"]


def test_explain_refuses_a_boolean_word(user, photo):
    response = user.post("/call/explain", json={"data": [photo, "greedy", None, None, None, None, True]})
    kind, message = event_result(user, "explain", response.json()["event_id"])
    assert kind == "error" and message.startswith("The word to show must be its position")


def test_behind_a_spaces_proxies_each_visitor_is_their_own_client():
    from uvicorn.middleware.proxy_headers import _TrustedHosts  # how uvicorn reads FORWARDED_ALLOW_IPS

    space = {"SPACE_ID": "someone/captioner"}
    traffic.trust_space_proxies(space)
    trusted = _TrustedHosts(space["FORWARDED_ALLOW_IPS"])
    # The Space's proxies (private addresses) append the address they saw; a visitor's own entries come before it.
    assert trusted.get_trusted_client_address("198.51.100.7, 203.0.113.5, 10.2.3.4")[0] == "203.0.113.5"
    assert trusted.get_trusted_client_address("203.0.113.9, 172.16.0.8")[0] == "203.0.113.9"
    elsewhere, operator = {}, {"SPACE_ID": "someone/captioner", "FORWARDED_ALLOW_IPS": "10.9.9.9"}
    traffic.trust_space_proxies(elsewhere)
    traffic.trust_space_proxies(operator)
    assert "FORWARDED_ALLOW_IPS" not in elsewhere and operator["FORWARDED_ALLOW_IPS"] == "10.9.9.9"


def test_kept_views_are_bounded_in_total():
    views = sessions.KeptViews(max_bytes=10_000)
    keys = [views.put(object(), 1000) for _ in range(30)]
    assert views.used <= 10_000 and len(views) == 10
    assert views.get(keys[0]) is None and views.get(keys[-1]) is not None and views.get("guess") is None


# ---- F2: a flood of many-photo requests ------------------------------------------------------------------


def test_a_flood_of_batches_leaves_single_photos_served(served, user, photo):
    flood = "203.0.113.50"
    with client(served, flood) as attacker:
        image = upload(attacker, (app.EXAMPLES_DIR / "cat.jpg").read_bytes())
        body = {"data": [[image] * app.MAX_BATCH_FILES, "greedy"]}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: attacker.post("/call/caption_many", json=body), range(40)))
        accepted = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code != 200]
        assert len(accepted) <= traffic.MAX_EVENTS_PER_CLIENT and len(refused) >= 40 - traffic.MAX_EVENTS_PER_CLIENT
        for answer in refused:
            assert_sentence(answer, 429, 503)
        assert_user_served(user, photo, times=8)
        kind, value = event_result(attacker, "caption_many", accepted[-1].json()["event_id"])
        assert kind == "complete" and len(value[2]["data"]) == app.MAX_BATCH_FILES


# ---- F5: orphans of failed uploads; the cache's bound ---------------------------------------------------------


def top_level_files(served) -> list[Path]:
    return [p for p in served.upload_dir.iterdir() if p.is_file()]


def test_failed_uploads_leave_no_files(served):
    with client(served, "203.0.113.60") as http:
        files = [("files", (f"{i}.jpg", os.urandom(2 * 2**20))) for i in range(3)] + [("files", ("..", b"x"))]
        response = http.post("/upload", files=files)
        assert response.status_code == 400
    deadline = time.monotonic() + upload_cache.ORPHAN_AGE_S + 15
    while top_level_files(served) and time.monotonic() < deadline:
        time.sleep(1)
    assert not top_level_files(served)


def cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_the_upload_cache_stays_within_its_bound(served, user):
    bound, answers = CACHE_MB * 2**20, []
    lock = threading.Lock()

    def fill(address: str) -> None:
        with client(served, address) as http:
            for _ in range(12):
                response = http.post("/upload", files=[("files", ("big.jpg", os.urandom(3 * 2**20)))])
                with lock:
                    answers.append(response)
                    assert cache_bytes(served.upload_dir) <= bound
                if response.status_code != 200:
                    return

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(fill, [f"192.0.2.{i}" for i in range(6)]))
    refused = [a for a in answers if a.status_code != 200]
    assert refused and {a.status_code for a in refused} <= {429, 503}
    details = {assert_sentence(a, 429, 503) for a in refused}
    assert upload_cache.CACHE_FULL in details  # six clients filled it: the last were told there's no room
    assert any("per user" in d for d in details)  # and one client alone can't: its share ends first
    assert cache_bytes(served.upload_dir) <= bound


def test_the_sweep_counts_a_files_time_in_the_cache_and_keeps_the_apps_own_files(tmp_path, tiny_captioner):
    cache = tmp_path / "cache"
    copied, upload = cache / "a1" / "cat.jpg", cache / "b2" / "photo.jpg"
    for path in (copied, upload):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * 100)
    day_ago = time.time() - 86_400
    os.utime(copied, (day_ago, day_ago))  # a copy that kept its original's mtime, as Gradio's copies do
    assert upload_cache.UploadCache(lambda: cache).sweep() == 200  # both came into the cache just now: kept
    # Past the age limit every file goes, but the app's own: the examples the page links for as long as it runs.
    assert upload_cache.UploadCache(lambda: cache, max_age_s=-1, keep=frozenset({str(copied)})).sweep() == 100
    assert copied.is_file() and not upload.exists()
    # The app's own files are the ones Gradio copied into its cache while building the page: the examples.
    limits = middleware.RequestLimits(None, blocks=app.build_demo(tiny_captioner), upload_dir=tmp_path / "uploads")
    assert sorted(Path(path).name for path in limits.cache.keep) == sorted(Path(p).name for p in app.example_images())


def test_near_its_bound_the_cache_counts_what_gradio_wrote_uncharged(tmp_path, monkeypatch):
    monkeypatch.setattr(upload_cache, "RECOUNT_EVERY_S", 0.0)  # every charge near the bound counts the disk
    cache_dir = tmp_path / "cache"
    (cache_dir / "out").mkdir(parents=True)
    (cache_dir / "out" / "heatmap.jpg").write_bytes(b"x" * 300)  # an output Gradio copied in: never charged
    cache = upload_cache.UploadCache(lambda: cache_dir, max_bytes=1000, client_bytes=1000)
    cache.charge("a", 500)  # far from the bound: counted, not checked against the disk
    (cache_dir / "up1").write_bytes(b"x" * 500)
    cache.charge("a", 150)
    (cache_dir / "up2").write_bytes(b"x" * 150)
    assert cache.used == 650
    with pytest.raises(upload_cache.CacheFull):  # 650 + 200 counted would fit; 950 on disk + 200 doesn't
        cache.charge("b", 200)
    assert cache.used == upload_cache.disk_bytes(cache_dir) == 950
    # The count is never lowered by the disk: bytes charged may not have landed yet.
    cache.charge("b", 30)
    assert cache.used == 980 and upload_cache.disk_bytes(cache_dir) == 950
    # The bound's last 2% (UPLOAD_SHARE) is left to the outputs Gradio writes uncharged between recounts.
    with pytest.raises(upload_cache.CacheFull):
        cache.charge("b", 1)
