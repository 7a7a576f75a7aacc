"""Attack benchmark: the app's memory and a user's latency while hostile and normal requests arrive together.

    python -m benchmarks.attack [--weights weights] [--requests 300] [--attackers 4] [--json FILE]

Starts `python app.py` with its decode workers' test hooks on (captioner/sandbox.py: a file beginning with a
magic string makes a worker hang, abort or eat memory, standing in for a decoder bug), then sends --requests
requests from --attackers concurrent threads, a shuffled mix of:
  normal captions of the example photos; crafted files (a decompression bomb, metadata and chunk floods, the
  slowest legal decode, damaged and non-image files); hostile payloads over raw HTTP (paths outside the upload
  cache, URLs as paths, data: URLs of 12 MB, over-long strings, malformed JSON, too many files in one upload,
  unknown events); request bodies that stall; and the decoder hooks.
Meanwhile a user captions an example photo every --user-interval seconds and records how long each took.
Then each finding of issue 18 runs from one client for --scenario-seconds (unsent or trickled bodies, floods
of /caption_many and /caption, data posted to /stream, file= URLs, failed uploads, ambiguous multipart
headers, new sessions, inline images' names, word=True) while the user captions every 0.5 s: the user's
latency, how the attack was answered, the app's memory and its upload cache, per scenario.

Measures the app process's memory (RSS; its decode workers are reported apart) at the start, the peak and the
end, how long each request took to be answered, and the user's latency while the attack ran. Every answer must
be a caption or a sentence (an HTTP 4xx with one, or the event's error message); none may go unanswered.
Targets: every request answered that way; the user served every time, p95 < 5 s; app RSS at the end within
300 MB of its start; the app still running; during each scenario, the user served every time, p95 < 2 s. Prints a summary, writes --json, exits 1 if a target fails.
The attack's files are built here (a few of tests/hostile_files.py's kinds): benchmarks import nothing from tests/.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.app_process import app_process, event_result
from benchmarks.load import RssMonitor, find_images, format_table, loadavg, run_and_report, summarise
from captioner.sandbox import TEST_HOOKS, TEST_HOOKS_ENV

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "attack.json"
MAX_GROWTH_MB = 300.0  # issue 10: app memory after the mixed requests within 300 MB of its start
MAX_USER_P95_S = 5.0  # issue 10: any request answered within 5 s, the app serving others meanwhile
FILE_META = {"_type": "gradio.FileData"}
SENTENCE = re.compile(r"[A-Z][^\n]{10,}[.)]")
# Each kind's share of the requests, in percent; the rest (a third) are normal captions.
MIX = {"crafted file": 35, "payload": 25, "stalled body": 4, "decoder hook": 3}


# ---- the attack's files ------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, rows: bytes, colour_type: int = 0, before_data: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + before_data + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _zeros_compressed(count: int) -> bytes:
    compressor, block = zlib.compressobj(9), bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(count >> 20)]
    return b"".join(parts) + compressor.compress(bytes(count & ((1 << 20) - 1))) + compressor.flush()


def crafted_files(photo: bytes) -> dict[str, bytes]:
    """A few files of each kind tests/hostile_files.py has: bombs, floods, the slowest legal decode, damage."""
    gif = base64.b64decode("R0lGODlhAQABAIAAAP8AAAAAACH5BAAAAAAALAAAAAABAAEAAAICRAEAOw==")  # 1x1 red
    after_palette = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    return {
        "bomb.png": _png(30000, 30000, zlib.compress(bytes(1000))),  # 900 megapixels claimed by 100 bytes
        "largest_legal.png": _png(7000, 5714, _zeros_compressed(5714 * 7001)),
        "iccp_flood.png": _png(8, 8, _zeros_compressed(72),
                               before_data=_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(2**20 - 1), 9)) * 2000),
        "chunk_flood.png": _png(8, 8, _zeros_compressed(72), before_data=_chunk(b"abCd", b"") * 1_000_000),
        "comment_flood.gif": gif[:after_palette] + b"\x21\xfe" + (b"\xff" + b"a" * 255) * 20_000 + b"\x00" + gif[after_palette:],
        "truncated.jpg": photo[: len(photo) // 3],
        "random.jpg": np.random.default_rng(0).bytes(100_000),
        "text.jpg": b"This is a text file, not a photo.\n" * 100,
    }


def hostile_payloads(upload_dir: Path) -> list[dict]:
    """Event-call bodies an attacker sends by hand: each must be refused with a sentence."""
    junk_url = "data:image/png;base64," + base64.b64encode(np.random.default_rng(1).bytes(12 * 2**20)).decode()
    return [
        {"data": [{"path": "/etc/passwd"}, "greedy", 5]},
        {"data": [{"path": str(ROOT / "app.py"), "meta": FILE_META}, "greedy", 5]},
        {"data": [{"path": f"{upload_dir}/../../etc/passwd", "meta": FILE_META}]},
        {"data": [{"path": "/dev/ptmx", "meta": FILE_META}]},
        {"data": [{"path": "http://203.0.113.9/huge.jpg", "meta": FILE_META}]},
        {"data": [{"path": None, "url": junk_url}]},
        {"data": [5, "greedy"]},
        {"data": [None, "x" * 20_000]},
        {"data": "not a list"},
        {"data": [None], "fn_index": 10_000, "session_hash": "x"},
    ]


# ---- sending -----------------------------------------------------------------------------------------


class Attack:
    """The requests, each returning (kind of answer, seconds): "caption", "sentence" or "bad: why"."""

    def __init__(self, url: str, upload_dir: Path, photos: list[bytes]):
        self.url, self.upload_dir = url, upload_dir
        self.photos = photos
        self.files = crafted_files(photos[0])
        self.hooks = [TEST_HOOKS[name] + b" benchmark" for name in ("hang", "abort", "hog")]
        self.payloads = hostile_payloads(upload_dir)

    def client(self):
        import httpx

        return httpx.Client(base_url=self.url + "/gradio_api", timeout=60)

    def send(self, http, kind: str, rng: random.Random) -> tuple[str, float]:
        start = time.monotonic()
        try:
            if kind == "caption":
                answer = self.caption(http, self.upload(http, rng.choice(self.photos)), rng.choice(["greedy", "beam"]))
            elif kind == "crafted file":
                name = rng.choice(sorted(self.files))
                answer = self.caption(http, self.upload(http, self.files[name], name), "greedy")
            elif kind == "decoder hook":
                answer = self.caption(http, self.upload(http, rng.choice(self.hooks), "hook.png"), "greedy")
            elif kind == "payload":
                body = rng.choice(self.payloads + ["too many files", "not json"])
                answer = self.payload(http, body)
            else:
                answer = self.stalled_body()
        except Exception as exc:  # a timeout, a dropped connection
            answer = f"bad: {type(exc).__name__}: {str(exc)[:200]}"
        return answer, time.monotonic() - start

    def upload(self, http, data: bytes, name: str = "photo.jpg") -> dict:
        response = http.post("/upload", files=[("files", (name, data))])
        response.raise_for_status()
        return {"path": response.json()[0], "meta": FILE_META}

    def caption(self, http, image: dict, method: str) -> str:
        return self.call(http, json.dumps({"data": [image, method, 3, None, None, ""]}))

    def call(self, http, body: str) -> str:
        response = http.post("/call/caption", content=body, headers={"content-type": "application/json"})
        if response.status_code != 200:
            return classify_refusal(response)
        kind, message = event_result(http, "caption", response.json()["event_id"])
        if kind == "complete":
            return "caption"
        return "sentence" if isinstance(message, str) and SENTENCE.fullmatch(message) else f"bad: error {message!r}"

    def payload(self, http, body) -> str:
        if body == "too many files":
            files = [("files", (f"{i}.jpg", b"x")) for i in range(100)]
            return classify_refusal(http.post("/upload", files=files))
        if body == "not json":
            return self.call(http, "{not json")
        if "fn_index" in body:
            return classify_refusal(http.post("/queue/join", json=body))
        return self.call(http, json.dumps(body))

    def stalled_body(self) -> str:
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /gradio_api/queue/join HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 5000\r\n\r\n{{\"data\": ".encode())
            status = sock.recv(200).decode(errors="replace").split("\r\n")[0]
        return "sentence" if " 408 " in status else f"bad: {status}"


def classify_refusal(response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if 400 <= response.status_code < 500 and isinstance(detail, str) and SENTENCE.fullmatch(detail):
        return "sentence"
    return f"bad: HTTP {response.status_code} {str(detail)[:120]!r}"


# ---- one client per finding of issue 18, a user captioning meanwhile -----------------------------------

ATTACKERS = "203.0.113.{}"  # each scenario's client's address, as the proxy reports it (X-Forwarded-For from loopback)
MAX_SCENARIO_USER_P95_S = 2.0  # issue 18: the user's /caption p95 while one client runs any of these


class Scenarios:
    """Issue 18's findings, each run by one client (`address`) in a loop until `stop` is set; each returns a
    Counter of how its requests were answered. F9 (a weights folder's config) is the operator's, not a request's."""

    def __init__(self, attack: Attack, photo: bytes, address: str):
        self.attack, self.url, self.address = attack, attack.url, address
        self.photo = photo
        self.big_png = attack.files["largest_legal.png"]  # 40 megapixels in 0.7 MB, as in finding 2

    def client(self):
        import httpx

        return httpx.Client(base_url=self.url + "/gradio_api", timeout=60, headers={"x-forwarded-for": self.address})

    def raw(self, head: str) -> socket.socket:
        host, port = self.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(f"{head}Host: {host}\r\nX-Forwarded-For: {self.address}\r\n\r\n".encode())
        return sock

    def unsent_bodies(self, stop: threading.Event) -> Counter:
        """F1: 12 joins declaring 28 MB each and sending nothing, each reopened as soon as it is answered."""
        head = "POST /gradio_api/queue/join HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 28000000\r\n"
        return self._held_bodies(stop, head, 12, None)

    def chunked_trickle(self, stop: threading.Event) -> Counter:
        """F1, variant: 12 chunked joins trickling a byte every 0.5 s."""
        head = "POST /gradio_api/call/explain HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        return self._held_bodies(stop, head, 12, b"1\r\n \r\n")

    def _held_bodies(self, stop, head: str, count: int, trickle: bytes | None) -> Counter:
        answers: Counter = Counter()

        def hold():
            while not stop.is_set():
                with self.raw(head) as sock:
                    sock.settimeout(0.5)
                    while not stop.is_set():
                        try:
                            status = sock.recv(200).split(b"\r\n")[0].decode(errors="replace")
                            answers[status.split(" ", 2)[1] if " " in status else "closed"] += 1
                            break
                        except TimeoutError:
                            if trickle:
                                sock.sendall(trickle)

        threads = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    def batch_flood(self, stop: threading.Event) -> Counter:
        """F2: one 40-megapixel PNG, then /caption_many calls naming it 50 times, as fast as they're accepted."""
        return self._flood(stop, "caption_many", lambda image: [[image] * 50, "greedy"])

    def caption_flood(self, stop: threading.Event) -> Counter:
        """F2, variant: /caption calls on the same 40-megapixel PNG, as fast as they're accepted."""
        return self._flood(stop, "caption", lambda image: [image, "greedy"])

    def _flood(self, stop, api: str, data) -> Counter:
        answers: Counter = Counter()
        with self.client() as http:
            image = self.attack.upload(http, self.big_png, "big.png")
            while not stop.is_set():
                response = http.post(f"/call/{api}", json={"data": data(image)})
                answers[f"HTTP {response.status_code}" if response.status_code != 200 else "queued"] += 1
                if response.status_code != 200:
                    stop.wait(0.2)
        return answers

    def stream_data(self, stop: threading.Event) -> Counter:
        """F3: data naming a URL posted to /stream/{event_id} of the client's own queued event."""
        answers: Counter = Counter()
        with self.client() as http:
            image = self.attack.upload(http, self.big_png, "big.png")
            # The caption event, by name: the page's first events are its menus' (unqueued).
            index = next(i for i, e in enumerate(http.get(self.url + "/config").json()["dependencies"]) if e["api_name"] == "caption")
            while not stop.is_set():
                joined = http.post("/queue/join", json={"data": [image, "greedy"], "fn_index": index, "session_hash": "s3"})
                if joined.status_code != 200:
                    answers[classify_refusal(joined)] += 1
                    stop.wait(0.5)
                    continue
                body = {"data": [{"path": "http://203.0.113.9/huge.jpg", "meta": FILE_META}], "fn_index": index, "session_hash": "s3"}
                answers[classify_refusal(http.post(f"/stream/{joined.json()['event_id']}", json=body))] += 1
                stop.wait(0.5)
        return answers

    def file_url(self, stop: threading.Event) -> Counter:
        """F4: GET /gradio_api/file=<URL> (and proxy=), which Gradio would fetch."""
        answers: Counter = Counter()
        with self.client() as http:
            while not stop.is_set():
                for path in ("/file=http://203.0.113.9/huge.jpg", "/proxy=http://203.0.113.9/x", "/file=//203.0.113.9/x"):
                    answers[classify_refusal(http.get(path, headers={"range": "bytes=0-"}))] += 1
                stop.wait(0.1)
        return answers

    def failed_uploads(self, stop: threading.Event) -> Counter:
        """F5: uploads of 12 files of 2 MB whose last is named "..": Gradio fails after storing the others."""
        answers: Counter = Counter()
        files = [("files", (f"{i}.jpg", bytes(2 * 2**20))) for i in range(11)] + [("files", ("..", b"x"))]
        with self.client() as http:
            while not stop.is_set():
                response = http.post("/upload", files=files)
                answers[f"HTTP {response.status_code}"] += 1
        return answers

    def ambiguous_boundaries(self, stop: threading.Event) -> Counter:
        """F6: 300 files per upload behind a BOUNDARY= in capitals, two boundary= or an escaped quote."""
        answers: Counter = Counter()
        part = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\nxxxx\r\n'
        body = part * 300 + b"--xyz--\r\n"
        with self.client() as http:
            while not stop.is_set():
                for content_type in ("multipart/form-data; BOUNDARY=xyz", "multipart/form-data; boundary=abc; boundary=xyz",
                                     'multipart/form-data; boundary="xyz\\""'):
                    answers[classify_refusal(http.post("/upload", content=body, headers={"content-type": content_type}))] += 1
        return answers

    def new_sessions(self, stop: threading.Event) -> Counter:
        """F7: /explain of a 768-pixel photo from a new session each time (the session keeps its view)."""
        answers: Counter = Counter()
        with self.client() as http:
            image = self.attack.upload(http, self.photo, "photo.jpg")
            index = next(i for i, e in enumerate(http.get(self.url + "/config").json()["dependencies"]) if e["api_name"] == "explain")
            while not stop.is_set():
                session = f"s{random.getrandbits(64):x}"
                joined = http.post("/queue/join", json={"data": [image, "greedy"], "fn_index": index, "session_hash": session})
                if joined.status_code != 200:
                    answers[classify_refusal(joined)] += 1
                    continue
                with http.stream("GET", "/queue/data", params={"session_hash": session}) as stream:
                    for line in stream.iter_lines():
                        if '"process_completed"' in line:
                            answers["explained" if '"success": true' in line or '"success":true' in line else "error"] += 1
                            break
        return answers

    def inline_names(self, stop: threading.Event) -> Counter:
        """F8: a data: URL image, then GET file= of the path its bytes' sha256 would give."""
        answers: Counter = Counter()
        url = "data:image/jpeg;base64," + base64.b64encode(self.photo).decode()
        guessed = f"{self.attack.upload_dir}/{hashlib.sha256(self.photo).hexdigest()}/inline-image"
        with self.client() as http:
            while not stop.is_set():
                self.attack.call(http, json.dumps({"data": [{"path": None, "url": url}, "greedy"]}))
                answers["guessed path answered" if http.get(f"/file={guessed}").status_code == 200 else "guess refused"] += 1
        return answers

    def boolean_word(self, stop: threading.Event) -> Counter:
        """F10: /explain with word=True."""
        answers: Counter = Counter()
        with self.client() as http:
            image = self.attack.upload(http, self.photo, "photo.jpg")
            while not stop.is_set():
                response = http.post("/call/explain", json={"data": [image, "greedy", None, None, None, None, True]})
                kind, message = event_result(http, "explain", response.json()["event_id"])
                answers["sentence" if kind == "error" and SENTENCE.fullmatch(str(message)) else f"bad: {kind}"] += 1
        return answers


SCENARIOS = {
    "F1 unsent bodies": Scenarios.unsent_bodies, "F1 chunked trickle": Scenarios.chunked_trickle,
    "F2 batch flood": Scenarios.batch_flood, "F2 caption flood": Scenarios.caption_flood,
    "F3 stream data": Scenarios.stream_data, "F4 file= URL": Scenarios.file_url, "F5 failed uploads": Scenarios.failed_uploads,
    "F6 ambiguous boundaries": Scenarios.ambiguous_boundaries, "F7 new sessions": Scenarios.new_sessions,
    "F8 inline names": Scenarios.inline_names, "F10 word=True": Scenarios.boolean_word,
}


def run_scenarios(app, attack: Attack, photos: list[bytes], seconds: float, progress) -> dict:
    """Each scenario for `seconds` while a user captions every 0.5 s: the user's latency, the attack's answers,
    the app's memory and upload cache."""
    import psutil

    process, results = psutil.Process(app.process.pid), {}
    for number, (name, scenario) in enumerate(SCENARIOS.items()):
        progress(f"scenario {name} ({seconds:g} s) ...")
        scenarios = Scenarios(attack, photos[0], ATTACKERS.format(10 + number))  # each its own client (and upload quota)
        stop, latencies, failures = threading.Event(), [], []
        rss_start, cache_start = process.memory_info().rss / 1e6, _folder_mb(app.upload_dir)

        def user():
            with attack.client() as http:
                image = attack.upload(http, photos[1])
                while not stop.is_set():
                    start = time.monotonic()
                    answer = attack.caption(http, image, "beam")
                    (latencies if answer == "caption" else failures).append(time.monotonic() - start)
                    stop.wait(0.5)

        answers: Counter = Counter()
        attacker = threading.Thread(target=lambda: answers.update(scenario(scenarios, stop)), daemon=True)
        user_thread = threading.Thread(target=user, daemon=True)
        attacker.start()
        time.sleep(1.0)  # the attack under way before the user comes
        user_thread.start()
        time.sleep(seconds)
        stop.set()
        user_thread.join(timeout=60)
        attacker.join(timeout=60)
        results[name] = {"user": summarise(latencies), "user_failures": len(failures), "attack_answers": dict(answers),
                         "rss_growth_mb": round(process.memory_info().rss / 1e6 - rss_start, 1),
                         "upload_cache_mb": [round(cache_start, 1), round(_folder_mb(app.upload_dir), 1)]}
        _drain(attack)  # the attack's queued events finish before the next scenario
    return results


def _drain(attack: Attack, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with attack.client() as http:
        while time.monotonic() < deadline and http.get("/queue/status").json().get("queue_size", 0):
            time.sleep(1.0)
    time.sleep(1.0)


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def run(args: argparse.Namespace) -> dict:
    import psutil

    clock, started = time.monotonic(), datetime.now(timezone.utc)
    rng = random.Random(args.seed)
    plan = [kind for kind, share in MIX.items() for _ in range(round(args.requests * share / 100))]
    plan += ["caption"] * (args.requests - len(plan))
    rng.shuffle(plan)
    photos = [Path(p).read_bytes() for p in find_images([str(ROOT / "examples")])][:10]

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - clock:6.1f} s] {message}", file=sys.stderr, flush=True)

    progress(f"starting app.py with {args.weights} (decode test hooks on) ...")
    with app_process(args.weights.resolve(), {TEST_HOOKS_ENV: "1"}, None, args.startup_timeout) as app:
        attack = Attack(app.url, app.upload_dir, photos)
        process = psutil.Process(app.process.pid)
        with attack.client() as http:  # one caption first: the encoder and workers warmed up, as a user finds them
            first = attack.caption(http, attack.upload(http, photos[0]), "greedy")
        rss_start = process.memory_info().rss / 1e6
        results: dict[str, list] = defaultdict(list)
        lock, work = threading.Lock(), list(enumerate(plan))
        user_latencies, user_failures, done = [], [], threading.Event()

        def attacker(seed: int) -> None:
            local = random.Random(seed)
            with attack.client() as http:
                while True:
                    with lock:
                        if not work:
                            return
                        _, kind = work.pop()
                    answer, seconds = attack.send(http, kind, local)
                    with lock:
                        results[kind].append((answer, seconds))

        def user() -> None:
            with attack.client() as http:
                image = attack.upload(http, photos[1])
                while not done.is_set():
                    start = time.monotonic()
                    answer = attack.caption(http, image, "beam")
                    (user_latencies if answer == "caption" else user_failures).append(time.monotonic() - start)
                    done.wait(args.user_interval)

        progress(f"attack: {len(plan)} requests from {args.attackers} threads ({dict(Counter(plan))}), and a user ...")
        threads = [threading.Thread(target=attacker, args=(args.seed + i,), daemon=True) for i in range(args.attackers)]
        user_thread = threading.Thread(target=user, daemon=True)
        attack_start = time.monotonic()
        with RssMonitor(app.process.pid) as monitor:
            user_thread.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=args.timeout_s)
            done.set()
            user_thread.join(timeout=60)
        attack_seconds = time.monotonic() - attack_start
        time.sleep(1.0)  # let the last answers' buffers go
        rss_end = process.memory_info().rss / 1e6
        workers_mb = sum(child.memory_info().rss for child in process.children()) / 1e6
        scenarios = run_scenarios(app, attack, photos, args.scenario_seconds, progress) if args.scenario_seconds else {}
        alive = app.process.poll() is None
        log_tail = app.output_tail(3000)

    answers = Counter(answer if not answer.startswith("bad") else "bad" for values in results.values() for answer, _ in values)
    bad = [f"{kind}: {answer}" for kind, values in results.items() for answer, _ in values if answer.startswith("bad")]
    answered = sum(len(values) for values in results.values())
    user = summarise(user_latencies)
    growth = rss_end - rss_start
    checks = [
        ("every request answered with a caption or a sentence", answered == len(plan) and not bad,
         f"{answered} of {len(plan)} answered, {len(bad)} otherwise"),
        ("the user's captions all served", bool(user_latencies) and not user_failures,
         f"{len(user_latencies)} served, {len(user_failures)} failed"),
        (f"the user's p95 < {MAX_USER_P95_S:g} s", user.get("p95_ms", 1e9) < MAX_USER_P95_S * 1000, f"{user.get('p95_ms')} ms"),
        (f"app RSS growth < {MAX_GROWTH_MB:g} MB", growth < MAX_GROWTH_MB, f"{growth:+.1f} MB"),
        *((f"{name}: the user served every time, p95 < {MAX_SCENARIO_USER_P95_S:g} s",
           not result["user_failures"] and result["user"].get("p95_ms", 1e9) < MAX_SCENARIO_USER_P95_S * 1000,
           f"{result['user'].get('count', 0)} served, {result['user_failures']} failed, p95 {result['user'].get('p95_ms')} ms")
          for name, result in scenarios.items()),
        ("the app still running", alive, "" if alive else "it exited"),
        ("the first caption", first == "caption", first),
    ]
    return {
        "meta": {"started": started.isoformat(timespec="seconds"), "weights": str(args.weights), "requests": len(plan),
                 "attackers": args.attackers, "mix": dict(Counter(plan)), "user_interval_s": args.user_interval,
                 "loadavg_start": args.loadavg_start, "loadavg_end": loadavg(), "seconds": round(time.monotonic() - clock, 1)},
        "answers": dict(answers),
        "first_bad": bad[:10],
        "attack_seconds": round(attack_seconds, 1),
        "latency_by_kind": {kind: summarise([s for _, s in values]) for kind, values in sorted(results.items())},
        "user_latency": user,
        "memory": {"rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1), "growth_mb": round(growth, 1),
                   "rss_peak_mb": round(monitor.peak / 1e6, 1), "rss_timeline_mb": monitor.timeline_mb(),
                   "decode_workers_rss_mb": round(workers_mb, 1)},
        "scenarios": scenarios,
        "checks": [{"name": name, "pass": bool(ok), "detail": detail} for name, ok, detail in checks],
        "all_pass": all(ok for _, ok, _ in checks),
        "server_log_tail": log_tail if bad or not alive else "",
    }


def report(results: dict) -> str:
    meta, mem = results["meta"], results["memory"]
    out = [
        f"Attack: {meta['requests']} requests from {meta['attackers']} threads, mix {meta['mix']}; weights {meta['weights']}; "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}",
        "",
        format_table([
            ["answers", ", ".join(f"{k} {v}" for k, v in sorted(results["answers"].items()))],
            ["attack, s", results["attack_seconds"]],
            ["app RSS at the start / peak / end, MB", f"{mem['rss_start_mb']} / {mem['rss_peak_mb']} / {mem['rss_end_mb']}"],
            ["app RSS growth, MB", f"{mem['growth_mb']:+.1f}"],
            ["app RSS by quarter of the attack, MB", " / ".join(map(str, mem["rss_timeline_mb"]))],
            ["decode workers' RSS at the end, MB", mem["decode_workers_rss_mb"]],
        ]),
        "",
        "Time to answer, ms (queueing included)",
        format_table([[kind, s.get("count", 0), s.get("p50_ms"), s.get("p95_ms"), s.get("max_ms")]
                      for kind, s in [*results["latency_by_kind"].items(), ("the user, during the attack", results["user_latency"])]],
                     ["", "requests", "p50", "p95", "max"]),
    ]
    if results.get("scenarios"):
        out += ["", f"One client per finding of issue 18 ({ATTACKERS.format('10-20')}), a user captioning every 0.5 s meanwhile",
                format_table([[name, r["user"].get("count", 0), r["user_failures"], r["user"].get("p50_ms"), r["user"].get("p95_ms"),
                               r["user"].get("max_ms"), ", ".join(f"{k} {v}" for k, v in sorted(r["attack_answers"].items())),
                               f"{r['rss_growth_mb']:+.0f}", " -> ".join(map(str, r["upload_cache_mb"]))]
                              for name, r in results["scenarios"].items()],
                             ["scenario", "user ok", "failed", "p50 ms", "p95 ms", "max ms", "the attack's answers",
                              "RSS MB", "cache MB"])]
    if results["first_bad"]:
        out += ["", "Not answered with a caption or a sentence:"] + [f"  {line}" for line in results["first_bad"]]
    out += ["", "Checks", format_table([[c["name"], "PASS" if c["pass"] else "FAIL", c["detail"]] for c in results["checks"]])]
    if results["server_log_tail"]:
        out += ["", "app.py output (tail):", results["server_log_tail"]]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack", description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, metavar="DIR", default=ROOT / "weights", help="weights folder for the app (default: weights/)")
    parser.add_argument("--requests", type=int, default=300, help="attack requests (default: %(default)s)")
    parser.add_argument("--attackers", type=int, default=4, help="concurrent attacking threads (default: %(default)s)")
    parser.add_argument("--user-interval", type=float, default=0.5, help="seconds between the user's captions (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="time limit for the attack (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for the app to start (default: %(default)s)")
    parser.add_argument("--scenario-seconds", type=float, default=15.0,
                        help="how long each of issue 18's scenarios runs (0: none; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the requests (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000 or not 1 <= args.attackers <= 32:
        parser.error("--requests must be 1..100000 and --attackers 1..32")
    return args


def main(argv=None) -> int:
    return run_and_report(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
