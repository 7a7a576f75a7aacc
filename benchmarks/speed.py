"""How fast is the captioner on this machine, and how much faster than the old way of decoding?

    python -m benchmarks.speed [--weights weights] [--images examples] [--repeats 10]
                               [--json benchmarks/results/speed.json] [--skip-resnet] [--skip-cold-start]

Measures, with warm-up runs first, time.perf_counter, and medians (p50/p95 where said):

  encoder       cap.encode() time per image, at batch 1 and at batch 32
  decoding      cap.caption_features() time per caption from precomputed features: greedy, beam 3, 5, 10
  caption()     end to end (file -> caption) p50 / p95, greedy and beam 5, next to encode() alone on the
                same images (measurements interleaved, so background load hits all of them alike)
  batch         caption_batch() throughput on 32 images vs encode() throughput on the same 32
  cold start    a new Python process: interpreter + import + load + first caption (wall clock), and that
                process's peak RSS (getrusage high-water mark) after the first caption and after a batch
                of 32 plus a beam-10 caption
  random resnet50   the encoder and decoding figures again for a resnet50 model with random weights
                    (real-size vocabulary and LSTM), built in a temporary folder
  old way       the decoding of hobby implementations, on the same weights and features: the whole padded
                prefix re-run through the Keras model with model.predict for every word (greedy), and
                once per beam for every word (beam search). It is slow, so it runs once on --old-images
                images (default 3). Its search rules mirror captioner.decoding, so both must give the same
                captions (the table says whether they do).

Then it checks the performance targets (PASS/FAIL), prints a table and writes everything to --json.
The exit status is 0 unless --strict is given and a target fails: timings on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "speed.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BEAM_WIDTHS = (3, 5, 10)

# The targets.
TARGET_GREEDY_VS_ENCODE = 1.5  # caption() p50 greedy <= 1.5x encode() alone on the same image
TARGET_BEAM5_VS_ENCODE = 2.0
TARGET_GREEDY_SPEEDUP = 20.0  # vs the old way (decoding from the same features)
TARGET_BEAM5_SPEEDUP = 50.0
TARGET_BATCH_VS_ENCODE = 0.8  # caption_batch() throughput >= 0.8x encode() throughput on the same images
TARGET_COLD_START_S = 8.0
TARGET_PEAK_RSS_MB = 1500.0  # 1.5 GB, in MB of 10^6 bytes


# ---- the old way ------------------------------------------------------------------------------------


class OldWayDecoder:
    """Decoding as hobby implementations do it: for every word, the whole caption prefix so far, padded
    to a fixed length, goes through the Keras model with `model.predict` — one call per word for greedy,
    one call per beam per word for beam search.

    Its search rules are captioner.decoding's (forbidden tokens, <end> not first, a beam's finished list,
    the top 2k candidates per step, at most `max_length` tokens), so on the same features it must give the
    same captions; only the cost differs. Classic code also lets finished captions hold beam slots; that
    changes which captions are found, not the cost per predict, so it is not reproduced here.
    Returns [(generated tokens, log-probability)], best first, like decoding.Hypothesis.
    """

    def __init__(self, model, vocab, max_length: int):
        self.model, self.vocab = model, vocab
        self.max_steps = max_length  # tokens to generate at most, <end> included (config.max_new_tokens)
        self.padded_length = max_length  # the longest prefix fed: <start> + max_length - 1 tokens
        self.predict_calls = 0

    def next_log_probs(self, features: np.ndarray, prefix: list[int], first_step: bool) -> np.ndarray:
        padded = np.zeros((1, self.padded_length), np.int32)
        padded[0, : len(prefix)] = prefix
        probs = self.model.predict([features[None, :], padded], verbose=0)[0, len(prefix) - 1].astype(np.float64)
        self.predict_calls += 1
        probs[self.vocab.forbidden_ids] = 0.0
        if first_step:
            probs[self.vocab.end_id] = 0.0
        with np.errstate(divide="ignore"):
            return np.log(probs / probs.sum())

    def greedy(self, features: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
        prefix, total = [self.vocab.start_id], 0.0
        for step in range(self.max_steps):
            log_probs = self.next_log_probs(features, prefix, first_step=step == 0)
            token = int(np.argmax(log_probs))
            total += float(log_probs[token])
            prefix.append(token)
            if token == self.vocab.end_id:
                break
        return [(tuple(prefix[1:]), total)]

    def beam(self, features: np.ndarray, beam_width: int) -> list[tuple[tuple[int, ...], float]]:
        k, end = beam_width, self.vocab.end_id
        beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        finished: list[tuple[tuple[int, ...], float]] = []
        for step in range(self.max_steps):
            last_step = step == self.max_steps - 1
            candidates = []
            for tokens, score in beams:  # one model.predict per beam
                log_probs = self.next_log_probs(features, [self.vocab.start_id, *tokens], first_step=step == 0)
                for token in np.argsort(-log_probs, kind="stable")[: 2 * k]:
                    candidates.append((score + float(log_probs[token]), tokens + (int(token),)))
            candidates.sort(key=lambda c: -c[0])
            beams = []
            for score, tokens in candidates[: 2 * k]:
                if not np.isfinite(score):
                    break
                if tokens[-1] == end or last_step:
                    if len(finished) < k:
                        finished.append((tokens, score))
                else:
                    beams.append((tokens, score))
                    if len(beams) == k:  # only endings that outrank the k-th live prefix count
                        break
            if len(finished) >= k or not beams:
                break
        return sorted(finished, key=lambda h: -h[1])[:k]

    def caption(self, features: np.ndarray, method: str = "greedy", beam_width: int = 5) -> list[tuple[str, float]]:
        """(feature_dim,) features -> [(caption text, log-probability)], best first, like Caption.candidates."""
        hyps = self.greedy(features) if method == "greedy" else self.beam(features, beam_width)
        return [(self.vocab.decode(tokens), score) for tokens, score in hyps]


# ---- measuring --------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def ms(seconds) -> float:
    return round(float(seconds) * 1000.0, 3)


def median(values) -> float:
    return float(np.median(values))


def p95(values) -> float:
    return float(np.percentile(values, 95))


@dataclass(frozen=True)
class Method:
    name: str  # "greedy", "beam3", ...
    method: str
    beam_width: int

    @property
    def kwargs(self) -> dict:
        return {"method": self.method, "beam_width": self.beam_width}


GREEDY = Method("greedy", "greedy", 1)
BEAMS = {k: Method(f"beam{k}", "beam", k) for k in BEAM_WIDTHS}


def measure_encoder(cap, images: list[Path], batch: list[Path], repeats: int, batch_repeats: int) -> dict:
    """cap.encode() per image at batch 1 (median over images x repeats) and at batch len(batch)."""
    from captioner.encoder import BATCH_SIZE

    cap.encode(images[:1])  # warm-up (the graph is traced on first use)
    cap.encode(batch[:BATCH_SIZE])  # encode() runs batches in chunks of BATCH_SIZE
    single = [timed(cap.encode, [image])[0] for _ in range(repeats) for image in images]
    batched = [timed(cap.encode, batch)[0] for _ in range(batch_repeats)]
    return {
        "batch1_ms_per_image": ms(median(single)),
        f"batch{len(batch)}_ms_per_image": ms(median(batched) / len(batch)),
        "batch_size": len(batch),
        "samples_batch1": len(single),
        "samples_batch": len(batched),
    }


def measure_decoding(cap, features: np.ndarray, repeats: int, methods: list[Method]) -> tuple[dict, dict]:
    """cap.caption_features() on one image's features at a time. Returns (summary, per-image medians in s)."""
    from captioner.decoding import DecodingOptions

    options = {m.name: DecodingOptions(m.method, m.beam_width) for m in methods}
    for m in methods:  # warm-up
        cap.caption_features(features[:1], options[m.name])
    times = {m.name: [[] for _ in features] for m in methods}
    tokens = {m.name: [] for m in methods}
    for _ in range(repeats):
        for i in range(len(features)):
            for m in methods:
                seconds, (result,) = timed(cap.caption_features, features[i : i + 1], options[m.name])
                times[m.name][i].append(seconds)
                tokens[m.name].append(len(result.text.split()) + 1)  # words + <end> (an upper bound at max length)
    summary, per_image = {}, {}
    for m in methods:
        all_times = [t for per in times[m.name] for t in per]
        per_image[m.name] = [median(per) for per in times[m.name]]
        summary[m.name] = {
            "ms_per_caption": ms(median(all_times)),
            "p95_ms": ms(p95(all_times)),
            "tokens_per_caption": round(float(np.mean(tokens[m.name])), 2),
            "samples": len(all_times),
        }
    return summary, per_image


def measure_end_to_end(cap, images: list[Path], repeats: int) -> dict:
    """caption() greedy and beam 5 vs encode() alone, interleaved image by image."""
    beam5 = BEAMS[5]
    cap.caption(images[0], **GREEDY.kwargs)  # warm-up
    cap.caption(images[0], **beam5.kwargs)
    samples = {"encode": [], "greedy": [], "beam5": []}
    for _ in range(repeats):
        for image in images:
            samples["encode"].append(timed(cap.encode, [image])[0])
            samples["greedy"].append(timed(cap.caption, image, **GREEDY.kwargs)[0])
            samples["beam5"].append(timed(cap.caption, image, **beam5.kwargs)[0])
    encode_p50 = median(samples["encode"])
    result = {"encode": {"p50_ms": ms(encode_p50), "p95_ms": ms(p95(samples["encode"]))}}
    for name in ("greedy", "beam5"):
        p50 = median(samples[name])
        result[name] = {"p50_ms": ms(p50), "p95_ms": ms(p95(samples[name])), "vs_encode": round(p50 / encode_p50, 3)}
    result["samples"] = len(samples["encode"])
    return result


def measure_batch(cap, batch: list[Path], repeats: int) -> dict:
    """Throughput (images/s) of caption_batch() and of encode() alone on the same images, interleaved."""
    beam5 = BEAMS[5]
    cap.caption_batch(batch, **GREEDY.kwargs)  # warm-up
    samples = {"encode": [], "greedy": [], "beam5": []}
    for _ in range(repeats):
        samples["encode"].append(timed(cap.encode, batch)[0])
        samples["greedy"].append(timed(cap.caption_batch, batch, **GREEDY.kwargs)[0])
        samples["beam5"].append(timed(cap.caption_batch, batch, **beam5.kwargs)[0])
    rate = {name: len(batch) / median(values) for name, values in samples.items()}
    return {
        "images": len(batch),
        "encode_images_per_s": round(rate["encode"], 2),
        "caption_batch_greedy_images_per_s": round(rate["greedy"], 2),
        "caption_batch_beam5_images_per_s": round(rate["beam5"], 2),
        "greedy_vs_encode": round(rate["greedy"] / rate["encode"], 3),
        "beam5_vs_encode": round(rate["beam5"] / rate["encode"], 3),
        "samples": repeats,
    }


def measure_old_way(cap, features: np.ndarray, ours_per_image: dict, encode_ms: float) -> dict:
    """The old decoding, once per image on the first len(features) images; compared with ours on the same ones."""
    from captioner.decoding import DecodingOptions

    old = OldWayDecoder(cap.model, cap.vocab, cap.config.max_new_tokens)
    old.next_log_probs(features[0], [cap.vocab.start_id], first_step=True)  # warm-up: predict() builds its function
    result = {"images": len(features), "runs_per_image": 1}
    for m in (GREEDY, BEAMS[5]):
        seconds, calls, same_best, same_all = [], [], [], []
        ours = cap.caption_features(features, DecodingOptions(m.method, m.beam_width))
        for i, row in enumerate(features):
            before = old.predict_calls
            t, candidates = timed(old.caption, row, m.method, m.beam_width)
            seconds.append(t)
            calls.append(old.predict_calls - before)
            same_best.append(candidates[0][0] == ours[i].text)
            same_all.append([c for c, _ in candidates] == [c for c, _ in ours[i].candidates])
        old_total, ours_total = sum(seconds), sum(ours_per_image[m.name][: len(features)])
        result[m.name] = {
            "old_ms_per_caption": ms(median(seconds)),
            "ours_ms_per_caption": ms(median(ours_per_image[m.name][: len(features)])),
            "speedup": round(old_total / ours_total, 1),  # total old time / total ours on the same images
            "predict_calls_per_caption": round(float(np.mean(calls)), 1),
            "ms_per_predict_call": ms(old_total / max(1, sum(calls))),
            "same_best_caption": all(same_best),
            "same_candidates": all(same_all),
            # old caption() = encode() + old decoding; vs ours end to end (encode + our decoding)
            "end_to_end_speedup": round((encode_ms + ms(median(seconds))) / (encode_ms + ms(median(ours_per_image[m.name][: len(features)]))), 2),
        }
    return result


COLD_START_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
args = json.loads(sys.argv[1])
from captioner import Captioner
t1 = time.perf_counter()
cap = Captioner.from_pretrained(args["weights"])
t2 = time.perf_counter()
text = cap.caption(args["image"]).text
t3 = time.perf_counter()
def cpu_s():  # this process's CPU time: less sensitive to other processes than the wall clock
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
def peak_mb():
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 1e6 if sys.platform == "darwin" else kb * 1024 / 1e6
print(json.dumps({"event": "first_caption", "import_s": t1 - t0, "load_s": t2 - t1, "first_caption_s": t3 - t2,
                  "caption": text, "peak_rss_mb": peak_mb(), "cpu_s": cpu_s()}), flush=True)
cap.caption_batch(args["batch"])
cap.caption(args["image"], "beam", 10)
print(json.dumps({"event": "done", "peak_rss_mb": peak_mb()}), flush=True)
"""


def measure_cold_start(weights: Path, image: Path, batch: list[Path], runs: int = 1, timeout: float = 180.0) -> dict:
    """New processes: wall clock from spawning to the first caption printed; peak RSS inside the process."""
    results = []
    for _ in range(runs):
        results.append(_cold_start_once(weights, image, batch, timeout))
    best = min(results, key=lambda r: r["seconds"])
    return {
        "seconds": best["seconds"],
        "seconds_all_runs": [r["seconds"] for r in results],
        "import_s": best["import_s"],
        "load_s": best["load_s"],
        "first_caption_s": best["first_caption_s"],
        "cpu_s": best["cpu_s"],
        "peak_rss_mb_first_caption": max(r["peak_rss_mb_first_caption"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "runs": runs,
        "workload_after_first_caption": f"caption_batch of {len(batch)} images + one beam-10 caption",
    }


def _cold_start_once(weights: Path, image: Path, batch: list[Path], timeout: float) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    argument = json.dumps({"weights": str(weights), "image": str(image), "batch": [str(p) for p in batch]})
    lines: queue.Queue = queue.Queue()
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", COLD_START_CHILD, argument], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=errors, text=True)

        def read():  # ends when the child closes its stdout
            for line in process.stdout:
                lines.put((time.perf_counter(), line))
            lines.put((time.perf_counter(), None))

        threading.Thread(target=read, daemon=True).start()
        events, deadline = {}, start + timeout
        try:
            while "done" not in events:
                try:
                    at, line = lines.get(timeout=max(0.1, deadline - time.perf_counter()))
                except queue.Empty:
                    raise RuntimeError(f"the cold-start process did not finish within {timeout:.0f} s") from None
                if line is None:
                    break
                if line.startswith("{"):
                    event = json.loads(line)
                    events[event["event"]] = (at, event)
            process.wait(timeout=max(1.0, deadline - time.perf_counter()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if "done" not in events or process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"the cold-start process failed (exit code {process.returncode}):\n"
                               + errors.read().decode(errors="replace")[-3000:])
    at, first = events["first_caption"]
    return {
        "seconds": round(at - start, 3),
        "import_s": round(first["import_s"], 3),
        "load_s": round(first["load_s"], 3),
        "first_caption_s": round(first["first_caption_s"], 3),
        "cpu_s": round(first["cpu_s"], 2),
        "peak_rss_mb_first_caption": round(first["peak_rss_mb"], 1),
        "peak_rss_mb": round(events["done"][1]["peak_rss_mb"], 1),
    }


def measure_random_resnet(images: list[Path], batch: list[Path], repeats: int, batch_repeats: int) -> dict:
    from captioner import Captioner
    from captioner.weights import write_random_weights

    with tempfile.TemporaryDirectory(prefix="speed_resnet50_") as folder:
        weights = write_random_weights(Path(folder) / "weights", "resnet50")  # real-size vocabulary and LSTM
        load_s, cap = timed(Captioner.from_pretrained, weights)
    encoder = measure_encoder(cap, images, batch, repeats, batch_repeats)
    features = cap.encode(images)
    decoding, _ = measure_decoding(cap, features, repeats, [GREEDY, *BEAMS.values()])
    return {
        "model": {"encoder": "resnet50", "encoder_weights": "random", "vocab_size": cap.config.vocab_size,
                  "units": cap.config.units, "max_length": cap.config.max_length},
        "load_s": round(load_s, 3),
        "encoder": encoder,
        "decoding": decoding,
    }


# ---- targets, table, JSON ---------------------------------------------------------------------------


def check_targets(results: dict) -> list[dict]:
    caption, batch, old, cold = results["caption"], results["batch"], results.get("old_way"), results.get("cold_start")
    targets = [
        ("caption() greedy p50 / encode() p50", caption["greedy"]["vs_encode"], "<=", TARGET_GREEDY_VS_ENCODE, "x"),
        ("caption() beam 5 p50 / encode() p50", caption["beam5"]["vs_encode"], "<=", TARGET_BEAM5_VS_ENCODE, "x"),
        ("speedup vs old way, greedy", old["greedy"]["speedup"] if old else None, ">=", TARGET_GREEDY_SPEEDUP, "x"),
        ("speedup vs old way, beam 5", old["beam5"]["speedup"] if old else None, ">=", TARGET_BEAM5_SPEEDUP, "x"),
        (f"caption_batch({batch['images']}) / encode() throughput", batch["greedy_vs_encode"], ">=", TARGET_BATCH_VS_ENCODE, "x"),
        ("cold start (new process to first caption)", cold["seconds"] if cold else None, "<", TARGET_COLD_START_S, "s"),
        ("peak memory (RSS high-water mark)", cold["peak_rss_mb"] if cold else None, "<", TARGET_PEAK_RSS_MB, "MB"),
    ]
    checked = []
    for name, value, op, limit, unit in targets:
        if value is None:
            status = "SKIP"
        else:
            ok = {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[op]
            status = "PASS" if ok else "FAIL"
        checked.append({"name": name, "value": value, "op": op, "limit": limit, "unit": unit, "status": status})
    return checked


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


def report(results: dict) -> str:
    meta, enc, dec = results["meta"], results["encoder"], results["decoding"]
    resnet = results.get("random_resnet50")
    out = [
        f"Captioner speed on {meta['machine']}",
        (f"weights: {meta['weights']} ({meta['model']['encoder']}, vocab {meta['model']['vocab_size']}, "
         f"LSTM {meta['model']['units']}, max length {meta['model']['max_length']}); images: {meta['images']} from "
         f"{meta['image_source']}; repeats: {meta['repeats']}; load average {meta['loadavg_start']} -> {meta['loadavg_end']}"),
        "All times are medians of repeated runs after warm-up, in milliseconds unless marked.",
        "",
        "Encoder: cap.encode(), ms per image",
    ]
    batch_key = f"batch{enc['batch_size']}_ms_per_image"
    header = ["", meta["model"]["encoder"]] + (["resnet50 (random)"] if resnet else [])
    out.append(format_table([
        ["batch 1", enc["batch1_ms_per_image"]] + ([resnet["encoder"]["batch1_ms_per_image"]] if resnet else []),
        [f"batch {enc['batch_size']}", enc[batch_key]] + ([resnet["encoder"][batch_key]] if resnet else []),
    ], header))
    out += ["", "Decoding from features: cap.caption_features(), ms per caption [tokens per caption]"]
    out.append(format_table([
        [name, dec[name]["ms_per_caption"], f"[{dec[name]['tokens_per_caption']}]"]
        + ([resnet["decoding"][name]["ms_per_caption"], f"[{resnet['decoding'][name]['tokens_per_caption']}]"] if resnet else [])
        for name in dec
    ], ["", meta["model"]["encoder"], ""] + (["resnet50 (random)", ""] if resnet else [])))

    cap = results["caption"]
    out += ["", f"End to end: caption() on an image file ({cap['samples']} samples each), next to encode() alone"]
    out.append(format_table([
        ["encode() alone", cap["encode"]["p50_ms"], cap["encode"]["p95_ms"], "1.00"],
        ["caption() greedy", cap["greedy"]["p50_ms"], cap["greedy"]["p95_ms"], cap["greedy"]["vs_encode"]],
        ["caption() beam 5", cap["beam5"]["p50_ms"], cap["beam5"]["p95_ms"], cap["beam5"]["vs_encode"]],
    ], ["", "p50 ms", "p95 ms", "p50 / encode"]))

    b = results["batch"]
    out += ["", f"Batch of {b['images']} images: throughput, images/s"]
    out.append(format_table([
        ["encode() alone", b["encode_images_per_s"], "1.00"],
        ["caption_batch() greedy", b["caption_batch_greedy_images_per_s"], b["greedy_vs_encode"]],
        ["caption_batch() beam 5", b["caption_batch_beam5_images_per_s"], b["beam5_vs_encode"]],
    ], ["", "images/s", "vs encode"]))

    old = results.get("old_way")
    if old:
        out += ["", (f"Ours vs the old way (model.predict per word / per beam per word), decoding the same features of "
                     f"{old['images']} images, old way run once per image; end-to-end: encode() + decoding")]
        out.append(format_table([
            [label, old[name]["old_ms_per_caption"], old[name]["ours_ms_per_caption"], f"{old[name]['speedup']:.1f}x",
             old[name]["predict_calls_per_caption"], old[name]["ms_per_predict_call"], f"{old[name]['end_to_end_speedup']:.2f}x",
             old[name]["same_best_caption"]]
            for label, name in (("greedy", "greedy"), ("beam 5", "beam5"))
        ], ["decoding", "old ms", "ours ms", "speedup", "predicts", "ms/predict", "end-to-end", "same caption"]))

    cold = results.get("cold_start")
    out += ["", "Cold start (new process: interpreter + import + load + first caption, wall clock) and memory"]
    if cold:
        out.append(format_table([
            ["cold start, s", cold["seconds"]],
            ["  of which import / load / first caption, s", f"{cold['import_s']:.2f} / {cold['load_s']:.2f} / {cold['first_caption_s']:.2f}"],
            ["  CPU time of that process until then, s", cold["cpu_s"]],
            ["peak RSS after the first caption, MB", cold["peak_rss_mb_first_caption"]],
            [f"peak RSS after {cold['workload_after_first_caption']}, MB", cold["peak_rss_mb"]],
        ]))
    else:
        out.append("  skipped (--skip-cold-start)")

    out += ["", "Targets"]
    out.append(format_table([
        [t["name"], "-" if t["value"] is None else f"{t['value']:,.2f} {t['unit']}", f"{t['op']} {t['limit']:g} {t['unit']}", t["status"]]
        for t in results["targets"]
    ], ["", "measured", "target", ""]))
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------------------


def find_images(sources: list[str]) -> list[Path]:
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


def machine_facts() -> dict:
    import tensorflow as tf

    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: TensorFlow picks (all cores)
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                                  "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS") if k in os.environ},
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.split("\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 2)[2],  # title + what it measures
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick smoke run: python -m benchmarks.speed --weights DIR --repeats 1 --batch 4 --batch-repeats 1 "
               "--skip-resnet --skip-cold-start --old-images 1. A full run takes about 2-3 minutes on 2 CPU cores.",
    )
    parser.add_argument("--weights", type=Path, metavar="DIR", default=ROOT / "weights", help="weights folder to load (default: weights/)")
    parser.add_argument("--images", nargs="+", metavar="PATH", default=[str(ROOT / "examples")],
                        help="image files and/or folders of images (default: examples/)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed passes over the images for batch-1, decoding and caption() figures (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size for the batch figures; images are cycled to fill it (default: %(default)s)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed runs of each batch measurement (default: %(default)s)")
    parser.add_argument("--old-images", type=int, default=3,
                        help="images to decode the old (slow) way, once each; 0 skips it (default: %(default)s)")
    parser.add_argument("--cold-starts", type=int, default=1, help="cold-start processes to time; the fastest is reported (default: %(default)s)")
    parser.add_argument("--skip-cold-start", action="store_true", help="don't start a new process for cold start and peak memory")
    parser.add_argument("--skip-resnet", action="store_true", help="skip the random-weights resnet50 figures")
    parser.add_argument("--resnet-repeats", type=int, default=2,
                        help="--repeats and --batch-repeats (at most) for the slower resnet50 figures (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", default=DEFAULT_JSON, help="where to write the results (default: benchmarks/results/speed.json)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if a target fails")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch", "batch_repeats", "cold_starts", "resnet_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.old_images < 0:
        parser.error("--old-images must be 0 or more")
    return args


def run(args: argparse.Namespace) -> dict:
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    images = find_images(args.images)
    batch = [images[i % len(images)] for i in range(args.batch)]
    weights = args.weights.resolve()
    load_start = loadavg()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - clock:6.1f} s] {message}", file=sys.stderr, flush=True)

    cold = None
    if not args.skip_cold_start:  # first, while this process has no TensorFlow thread pools of its own
        progress("cold start in a new process ...")
        cold = measure_cold_start(weights, images[0], batch, args.cold_starts)

    from captioner import Captioner

    progress(f"loading {weights} ...")
    load_s, cap = timed(Captioner.from_pretrained, weights)
    progress("encoder ...")
    encoder = measure_encoder(cap, images, batch, args.repeats, args.batch_repeats)
    progress("decoding from features ...")
    features = cap.encode(images)
    decoding, per_image = measure_decoding(cap, features, args.repeats, [GREEDY, *BEAMS.values()])
    progress("caption() end to end ...")
    caption = measure_end_to_end(cap, images, args.repeats)
    progress(f"batches of {len(batch)} ...")
    batch_results = measure_batch(cap, batch, args.batch_repeats)
    old = None
    if args.old_images:
        progress(f"the old way on {min(args.old_images, len(images))} images (slow) ...")
        old = measure_old_way(cap, features[: args.old_images], per_image, encoder["batch1_ms_per_image"])
    resnet = None
    if not args.skip_resnet:
        progress("random-weights resnet50 ...")
        resnet = measure_random_resnet(images, batch, args.resnet_repeats, min(args.batch_repeats, args.resnet_repeats))

    results = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "weights": str(weights),
            "model": {"encoder": cap.config.encoder, "encoder_weights": cap.weights.encoder_weights if cap.weights else None,
                      "vocab_size": cap.config.vocab_size, "units": cap.config.units, "max_length": cap.config.max_length},
            "image_source": " ".join(args.images),
            "images": len(images),
            "repeats": args.repeats,
            "batch_repeats": args.batch_repeats,
            "load_s": round(load_s, 3),
            "loadavg_start": load_start,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            **machine_facts(),
        },
        "encoder": encoder,
        "decoding": decoding,
        "caption": caption,
        "batch": batch_results,
        "old_way": old,
        "cold_start": cold,
        "random_resnet50": resnet,
    }
    results["targets"] = check_targets(results)
    results["all_pass"] = all(t["status"] != "FAIL" for t in results["targets"])
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["seconds"] = round(time.perf_counter() - clock, 1)
    progress("done")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.weights / "config.json").is_file():
        print(f"error: no weights folder at {args.weights} (no config.json); pass --weights DIR", file=sys.stderr)
        return 2
    results = run(args)
    print(report(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {args.json} ({results['meta']['seconds']:.0f} s).")
    return 1 if args.strict and not results["all_pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
