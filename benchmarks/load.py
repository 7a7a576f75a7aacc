"""Load test: the Gradio app serving many caption requests at once, over loopback.

    python -m benchmarks.load [--weights weights] [--requests 500] [--clients 16] [--timeout-s 600]

Starts `python app.py --weights DIR --host 127.0.0.1 --port <free port>`, sends one warm-up request per
(image, method, beam width) from up to --clients clients at once, then --requests requests from --clients concurrent gradio_client.Client
threads, mixing greedy and beam search (widths 3 and 5) over the example images. It measures failed
requests, throughput, latency (p50/p95, seen by the clients, queueing included) and the app process's
memory (RSS) after the warm-up, during and after the load. It checks that every response for one
(image, method, width) is identical (the app's queue runs several captions at once, so decoding must be
thread-safe) and equal to what a single-threaded in-process Captioner says. Before the app starts, it
times what the app's decode worker pool (captioner/sandbox.py) adds to each caption: the same file decoded
in a worker and in-process, --pool-repeats times each.

Targets: no failed request, every request answered, consistent captions, RSS growth < 100 MB, decode
worker overhead < 5 ms per caption.
Prints a summary, writes --json, and exits with status 1 if a target fails (2 if the app can't start).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.app_process import app_process
from captioner.decoding import DecodingOptions
from captioner.image import IMAGE_SUFFIXES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "load.json"
METHODS = (("greedy", 5), ("beam", 3), ("beam", 5))  # (method, beam width sent); greedy ignores the width
MAX_GROWTH_MB = 100.0
MAX_POOL_OVERHEAD_MS = 5.0  # what a decode worker may add to a caption (issue 10)
LOGPROB_TOLERANCE = 6e-3  # the app's table rounds log-probabilities to 2 decimals


def reference_captions(weights: Path, combos: list[tuple]) -> dict:
    """What a single-threaded in-process Captioner says for each (image, method, width)."""
    from captioner import Captioner

    captioner = Captioner.from_pretrained(weights)
    references = {}
    for image, method, width in combos:
        # Requests leave out the length penalty, so the app applies its default: the recommended one.
        result = captioner.caption(image, DecodingOptions(method, beam_width=width))
        references[(image, method, width)] = (result.text, [(text, float(lp)) for text, lp in result.candidates])
    return references


def decode_pool_overhead(weights: Path, images: list[str], repeats: int) -> dict:
    """What the app's decode worker adds to a caption: one file decoded in a worker minus the same in-process.

    Interleaved, median of `repeats` per image; also checks that both give the same pixels.
    """
    from captioner.encoder import ENCODERS
    from captioner.image import prepare_pixels
    from captioner.sandbox import DecodePool
    from captioner.weights import read_folder

    size = ENCODERS[read_folder(weights).config.encoder].input_size
    rows = []
    with DecodePool(workers=1) as pool:
        pool.wait_ready()
        for image in images:
            data = Path(image).read_bytes()
            if not np.array_equal(pool.prepare_pixels(data, size), prepare_pixels(data, size)):
                raise AssertionError(f"the decode worker's pixels differ from in-process decoding for {image}")
            in_process, in_worker = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                prepare_pixels(data, size)
                middle = time.perf_counter()
                pool.prepare_pixels(data, size)
                in_process.append(middle - start)
                in_worker.append(time.perf_counter() - middle)
            rows.append((float(np.median(in_process)), float(np.median(in_worker)), len(data)))
    overheads = [worker - local for local, worker, _ in rows]
    return {
        "images": len(rows),
        "repeats": repeats,
        "overhead_ms": round(float(np.mean(overheads)) * 1000, 2),  # per caption, averaged over the images
        "overhead_max_ms": round(max(overheads) * 1000, 2),
        "in_process_decode_ms": round(float(np.mean([r[0] for r in rows])) * 1000, 2),
        "in_worker_decode_ms": round(float(np.mean([r[1] for r in rows])) * 1000, 2),
        "mean_file_kb": round(float(np.mean([r[2] for r in rows])) / 1024, 1),
    }


def response_key(output) -> tuple:
    """The app's (caption, candidates table, facts, what the encoder sees) -> what must be identical across requests
    (facts has a timing)."""
    text, table, *_ = output
    rows = table["data"] if isinstance(table, dict) else table
    headers = [str(h) for h in table.get("headers", [])] if isinstance(table, dict) else []
    # The log-probability column ("log-prob"; once "log-probability"), wherever the table puts it.
    column = next((i for i, header in enumerate(headers) if header.startswith("log-prob")), 2)
    return text, tuple((row[1], float(row[column])) for row in rows)


def matches_reference(key: tuple, reference: tuple) -> bool:
    text, rows = key
    ref_text, ref_candidates = reference
    return (
        text == ref_text
        and [caption for caption, _ in rows] == [caption for caption, _ in ref_candidates]
        and all(abs(lp - ref_lp) <= LOGPROB_TOLERANCE for (_, lp), (_, ref_lp) in zip(rows, ref_candidates))
    )


class RssMonitor:
    """Samples a process's RSS every `interval` seconds in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, int]] = []  # (monotonic time, RSS bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except Exception:  # the process ended
                return
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    def timeline_mb(self, parts: int = 4) -> list[float]:
        """RSS at the end of each of `parts` equal slices of the sampled time: does it level off?"""
        if not self.samples:
            return []
        start, end = self.samples[0][0], self.samples[-1][0]
        marks = [start + (end - start) * (i + 1) / parts for i in range(parts)]
        return [round(max(rss for t, rss in self.samples if t <= mark) / 1e6, 1) for mark in marks]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def process_facts(pid: int) -> dict:
    import psutil

    process = psutil.Process(pid)
    cpu = process.cpu_times()
    facts = {"rss_mb": round(process.memory_info().rss / 1e6, 1), "threads": process.num_threads(), "cpu_s": cpu.user + cpu.system}
    with contextlib.suppress(Exception):
        facts["open_files"] = process.num_fds()
    return facts


def run_load(url: str, plan: list[tuple], clients: int, deadline: float, on_result) -> dict:
    """Send `plan`'s requests from `clients` threads, each with its own Client; stop at `deadline` (monotonic)."""
    from gradio_client import Client, handle_file

    work: queue.Queue = queue.Queue()
    for spec in plan:
        work.put(spec)
    client_errors = []

    def worker():
        try:
            client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        except Exception as exc:
            client_errors.append(f"{type(exc).__name__}: {exc}")
            return
        try:
            while time.monotonic() < deadline:
                try:
                    spec = work.get_nowait()
                except queue.Empty:
                    return
                image, method, width = spec
                start = time.perf_counter()
                job = None
                try:
                    job = client.submit(handle_file(image), method, width, prefix="", api_name="/caption")
                    output = job.result(timeout=max(1.0, deadline - time.monotonic()))
                    on_result(spec, time.perf_counter() - start, output, None)
                except Exception as exc:
                    if job is not None:
                        with contextlib.suppress(Exception):
                            job.cancel()
                    on_result(spec, time.perf_counter() - start, None, f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            with contextlib.suppress(Exception):
                client.close()

    threads = [threading.Thread(target=worker, name=f"client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 30)
    return {"unsent": work.qsize(), "client_errors": client_errors, "stuck_threads": sum(t.is_alive() for t in threads)}


def find_images(sources: list[str]) -> list[Path]:
    """Image files, and the images in folders, in order."""
    images = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise SystemExit(f"error: no image file or folder at {path}")
    if not images:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(sources)}")
    return images


def format_table(rows: list[list], header: list[str] | None = None, indent: str = "  ") -> str:
    rows = [[_cell(c) for c in row] for row in ([header] if header else []) + rows]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append(indent + "  ".join(cells).rstrip())
        if header and n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def summarise(samples: list[float]) -> dict:
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "p50_ms": round(float(np.median(samples)) * 1000, 1),
        "p95_ms": round(float(np.percentile(samples, 95)) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


def run(args: argparse.Namespace) -> dict:
    clock, started = time.monotonic(), datetime.now(timezone.utc)
    images = [str(p) for p in find_images(args.images)][: args.max_images]
    combos = [(image, method, width) for image in images for method, width in METHODS]
    rng = random.Random(args.seed)
    plan = [combos[i % len(combos)] for i in range(args.requests)]
    rng.shuffle(plan)
    weights = args.weights.resolve()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - clock:6.1f} s] {message}", file=sys.stderr, flush=True)

    lock = threading.Lock()
    responses: dict[tuple, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []

    def on_result(spec, seconds, output, error, phase="load"):
        with lock:
            if error is not None:
                failures.append(f"{phase}: {Path(spec[0]).name} {spec[1]} {spec[2]}: {error}")
                return
            responses[spec][response_key(output)] += 1
            if phase == "load":
                latencies["all"].append(seconds)
                latencies[spec[1] if spec[1] == "greedy" else f"beam{spec[2]}"].append(seconds)

    progress("single-threaded in-process reference captions ...")
    references = reference_captions(weights, combos)
    progress(f"decode worker overhead: {len(images)} images x {args.pool_repeats} ...")
    pool = decode_pool_overhead(weights, images, args.pool_repeats)
    progress(f"starting app.py with {weights} ...")
    remaining = max(1.0, args.startup_timeout - (time.monotonic() - clock))
    with app_process(weights, {"TF_CPP_MIN_LOG_LEVEL": "2"}, args.port, remaining) as app:
        url, process, startup_s = app.url, app.process, app.startup_seconds
        progress(f"app serving at {url}; warm-up: {len(combos)} requests, one per (image, method, width), "
                 f"from {min(args.clients, len(combos))} clients ...")
        deadline = time.monotonic() + args.timeout_s
        # Concurrent, so that the app's worker threads and their buffers exist before "before" is measured.
        warm = run_load(url, combos, min(args.clients, len(combos)), deadline, lambda *a: on_result(*a, phase="warm-up"))
        before = process_facts(process.pid)
        progress(f"load: {len(plan)} requests from {args.clients} clients ...")
        load_start, own_cpu_start = time.monotonic(), time.process_time()
        with RssMonitor(process.pid) as monitor:
            load = run_load(url, plan, args.clients, deadline, on_result)
        load_seconds, own_cpu = time.monotonic() - load_start, time.process_time() - own_cpu_start
        after = process_facts(process.pid)
        server_alive = process.poll() is None
        server_log = app.output_tail(3000) if failures or not server_alive else ""

    completed = len(latencies["all"])
    inconsistent = {spec: counts for spec, counts in responses.items() if len(counts) > 1}
    mismatched = [spec for spec, counts in responses.items() if not all(matches_reference(k, references[spec]) for k in counts)]
    growth = after["rss_mb"] - before["rss_mb"]
    load_failures = [f for f in failures if f.startswith("load:")]
    checks = [
        ("no failed request", not failures, f"{len(failures)} failed"),
        ("every request answered", completed == len(plan) and not load["client_errors"],
         f"{completed} of {len(plan)} answered" + (f", {load['unsent']} not sent before --timeout-s" if load["unsent"] else "")),
        ("same caption for the same (image, method, width)", not inconsistent, f"{len(inconsistent)} combos differ"),
        ("equal to the in-process Captioner", not mismatched, f"{len(mismatched)} combos differ"),
        (f"RSS growth < {MAX_GROWTH_MB:g} MB", growth < MAX_GROWTH_MB, f"{growth:+.1f} MB"),
        ("the app still running", server_alive, "" if server_alive else "it exited"),
        (f"decode worker overhead < {MAX_POOL_OVERHEAD_MS:g} ms per caption", pool["overhead_ms"] < MAX_POOL_OVERHEAD_MS,
         f"{pool['overhead_ms']:.2f} ms"),
    ]
    return {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "weights": str(weights),
            "url": url,
            "requests": len(plan),
            "clients": args.clients,
            "images": len(images),
            "methods": [f"{m}{'' if m == 'greedy' else w}" for m, w in METHODS],
            "timeout_s": args.timeout_s,
            "app_startup_s": round(startup_s, 1),
            "loadavg_start": args.loadavg_start,
            "loadavg_end": loadavg(),
            "seconds": round(time.monotonic() - clock, 1),
        },
        "requests": {
            "planned": len(plan),
            "completed": completed,
            "failed": len(load_failures),
            "failed_warmup": len(failures) - len(load_failures),
            "unsent": load["unsent"],
            "first_failures": failures[:5],
            "client_errors": load["client_errors"][:5] + warm["client_errors"][:5],
        },
        "throughput_rps": round(completed / load_seconds, 2) if load_seconds > 0 else None,
        "load_seconds": round(load_seconds, 2),
        # On a small machine the clients compete with the app for the CPU: how much each used during the load.
        "cpu_seconds": {"app": round(after["cpu_s"] - before["cpu_s"], 1), "clients": round(own_cpu, 1)},
        "latency": {name: summarise(latencies[name]) for name in ("all", "greedy", "beam3", "beam5")},
        "decode_pool": pool,
        "memory": {
            "rss_before_mb": before["rss_mb"],
            "rss_after_mb": after["rss_mb"],
            "rss_peak_mb": round(max(monitor.peak / 1e6, after["rss_mb"], before["rss_mb"]), 1),
            "growth_mb": round(growth, 1),
            "rss_timeline_mb": monitor.timeline_mb(),  # at the end of each quarter of the load phase
            "threads_before": before["threads"],
            "threads_after": after["threads"],
            "open_files_before": before.get("open_files"),
            "open_files_after": after.get("open_files"),
        },
        "consistency": {
            "combos": len(combos),
            "combos_answered": len(responses),
            "inconsistent": [f"{Path(s[0]).name} {s[1]} {s[2]}: {len(c)} different answers" for s, c in inconsistent.items()][:5],
            "mismatched_reference": [
                f"{Path(s[0]).name} {s[1]} {s[2]}: app {next(iter(responses[s]))[0]!r} vs in-process {references[s][0]!r}"
                for s in mismatched
            ][:5],
        },
        "checks": [{"name": name, "pass": bool(ok), "detail": detail} for name, ok, detail in checks],
        "all_pass": all(ok for _, ok, _ in checks),
        "server_log_tail": server_log,
    }


def report(results: dict) -> str:
    meta, req, mem, lat = results["meta"], results["requests"], results["memory"], results["latency"]
    out = [
        (f"App load test: {meta['requests']} requests from {meta['clients']} concurrent clients, {meta['images']} images x "
         f"{', '.join(meta['methods'])}; weights {meta['weights']}; load average {meta['loadavg_start']} -> {meta['loadavg_end']}"),
        "",
        format_table([
            ["requests answered / planned", f"{req['completed']} / {req['planned']}"],
            ["failed (load / warm-up)", f"{req['failed']} / {req['failed_warmup']}"],
            ["throughput, requests/s", results["throughput_rps"]],
            ["load phase, s", results["load_seconds"]],
            ["app RSS after warm-up, MB", mem["rss_before_mb"]],
            ["app RSS after the load, MB", mem["rss_after_mb"]],
            ["app RSS peak during the load, MB", mem["rss_peak_mb"]],
            ["app RSS growth, MB", f"{mem['growth_mb']:+.1f}"],
            ["app RSS by quarter of the load, MB", " / ".join(map(str, mem["rss_timeline_mb"]))],
            ["CPU seconds during the load: app / clients", f"{results['cpu_seconds']['app']} / {results['cpu_seconds']['clients']}"],
            ["app threads before / after", f"{mem['threads_before']} / {mem['threads_after']}"],
            ["decode worker overhead per caption, ms (mean / worst image)",
             f"{results['decode_pool']['overhead_ms']} / {results['decode_pool']['overhead_max_ms']}"],
            ["decoding an example photo in-process / in a worker, ms",
             f"{results['decode_pool']['in_process_decode_ms']} / {results['decode_pool']['in_worker_decode_ms']}"],
        ]),
        "",
        "Latency seen by the clients (queueing included), ms",
        format_table([[name, s.get("count", 0), s.get("p50_ms"), s.get("p95_ms"), s.get("max_ms")] for name, s in lat.items()],
                     ["", "requests", "p50", "p95", "max"]),
    ]
    if req["first_failures"] or req["client_errors"]:
        out += ["", "First failures:"] + [f"  {f}" for f in req["first_failures"] + req["client_errors"]]
    for name in ("inconsistent", "mismatched_reference"):
        if results["consistency"][name]:
            out += ["", f"{name}:"] + [f"  {line}" for line in results["consistency"][name]]
    out += ["", "Checks", format_table([[c["name"], "PASS" if c["pass"] else "FAIL", c["detail"]] for c in results["checks"]])]
    if results["server_log_tail"]:
        out += ["", "app.py output (tail):", results["server_log_tail"]]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__.split("\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", type=Path, metavar="DIR", default=ROOT / "weights", help="weights folder for the app (default: weights/)")
    parser.add_argument("--requests", type=int, default=500, help="requests to send after the warm-up (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, one thread each (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="time limit for the warm-up and the load together; requests not sent by then fail the run (default: %(default)s)")
    parser.add_argument("--images", nargs="+", metavar="PATH", default=[str(ROOT / "examples")],
                        help="image files and/or folders (default: examples/)")
    parser.add_argument("--max-images", type=int, default=10, help="use at most this many images (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds for the app to start serving (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the order of the requests (default: %(default)s)")
    parser.add_argument("--pool-repeats", type=int, default=30, help="decodes per image for the worker overhead (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", default=DEFAULT_JSON, help="where to write the results (default: benchmarks/results/load.json)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        parser.error("--requests must be between 1 and 100000")
    if not 1 <= args.clients <= 64:
        parser.error("--clients must be between 1 and 64 (the app queues at most 64 requests)")
    if not 1 <= args.timeout_s <= 24 * 3600 or args.max_images < 1:
        parser.error("--timeout-s must be between 1 and 86400 s, --max-images at least 1")
    return args


def run_and_report(args: argparse.Namespace, run, report) -> int:
    """The benchmarks' common main: run(args) against the app, print report(results), write them to --json.
    Exit status 0 when every target passed, 1 when one failed, 2 when there is no model or the app didn't start."""
    if not (args.weights / "config.json").is_file():
        print(f"error: no weights folder at {args.weights} (no config.json); pass --weights DIR", file=sys.stderr)
        return 2
    args.loadavg_start = loadavg()
    try:
        results = run(args)
    except RuntimeError as exc:  # the app didn't start
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.json} ({results['meta']['seconds']:.0f} s).")
    return 0 if results["all_pass"] else 1


def main(argv=None) -> int:
    return run_and_report(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
