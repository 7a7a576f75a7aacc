"""Where decoding's time goes: the figures behind the step model's and the decoders' fast paths.

    python -m benchmarks.decoding [--weights weights] [--images examples/*.jpg] [--repeats 5] [--json PATH]
                                  [--products] [--paths]   (both when neither is given)

  products  the products of one step (model.StepModel), microseconds each, medians of repeated runs:
            the output layer (rows x units) @ (units x vocab), whole and by blocks of 32, 64 and 128 columns
            (StepModel._logits uses blocks of model.OUTPUT_BLOCK_COLUMNS for 2 to model.MAX_ROWS_BY_BLOCKS
            rows), and the LSTM's recurrent product, by gate (what StepModel._lstm does) and whole
  paths     decoding one image's features, ms per caption, for greedy and beam 3, 5 and 10: with the
            decoders' one-image paths (TokenDecoder.one_image_path) and without them (the batch's
            bookkeeping for one image), interleaved; and per image in a batch of 16 images

Single-threaded BLAS, as the app and the CLI run (decoding.limit_blas_threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROWS = (1, 2, 3, 5, 10, 16, 24, 32, 50)  # greedy's one row, beam widths, a few images' beams
BLOCK_WIDTHS = (32, 64, 128)
PATH_SETTINGS = {"greedy": {"method": "greedy"}, "beam3": {"beam_width": 3}, "beam5": {}, "beam10": {"beam_width": 10}}


def microseconds(function, calls: int = 300, repeats: int = 5) -> float:
    """The median over `repeats` runs of the mean time of `calls` calls, in microseconds."""
    function()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return round(statistics.median(runs), 1)


def measure_products(model, repeats: int) -> dict:
    from captioner.model import column_blocks

    rng = np.random.default_rng(0)
    kernel, units = model.output_kernel, model.units
    blocks = {width: column_blocks(kernel, width) for width in BLOCK_WIDTHS}
    recurrent_by_gate, recurrent_whole = model._step_recurrent_kernel, model.recurrent_kernel
    results = {}
    for rows in ROWS:
        hidden = rng.random((rows, units), np.float32)
        row = {"output_whole_us": microseconds(lambda: np.matmul(hidden, kernel), repeats=repeats)}  # noqa: B023 (called here)
        for width, stacked in blocks.items():
            row[f"output_blocks{width}_us"] = microseconds(lambda: np.matmul(hidden, stacked), repeats=repeats)  # noqa: B023
        row["recurrent_by_gate_us"] = microseconds(lambda: np.matmul(hidden, recurrent_by_gate), repeats=repeats)  # noqa: B023
        row["recurrent_whole_us"] = microseconds(lambda: np.matmul(hidden, recurrent_whole), repeats=repeats)  # noqa: B023
        results[rows] = row
    return results


def measure_paths(captioner, features: np.ndarray, repeats: int) -> dict:
    from captioner.decoding import TokenDecoder

    tasks = {name: captioner.decoding_task(**overrides) for name, overrides in PATH_SETTINGS.items()}
    samples = {(name, path): [] for name in tasks for path in ("one_image_path", "batch_bookkeeping")}
    batch = np.resize(features, (16, features.shape[1]))
    batch_ms = {name: [] for name in tasks}
    for task in tasks.values():
        task.run(features[:1])  # warm-up
    try:
        for _ in range(repeats):
            for i in range(len(features)):
                for name, task in tasks.items():
                    for path, on in (("one_image_path", True), ("batch_bookkeeping", False)):
                        TokenDecoder.one_image_path = on
                        start = time.perf_counter()
                        task.run(features[i : i + 1])
                        samples[name, path].append((time.perf_counter() - start) * 1000)
            for name, task in tasks.items():
                start = time.perf_counter()
                task.run(batch)
                batch_ms[name].append((time.perf_counter() - start) * 1000 / len(batch))
    finally:
        TokenDecoder.one_image_path = True
    results = {}
    for name in tasks:
        one, bookkeeping = (round(statistics.median(samples[name, path]), 3) for path in ("one_image_path", "batch_bookkeeping"))
        results[name] = {"one_image_path_ms": one, "batch_bookkeeping_ms": bookkeeping,
                         "saved": round(1 - one / bookkeeping, 3), "in_batch_of_16_ms_per_image": round(statistics.median(batch_ms[name]), 3)}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoding", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="weights folder (default: the bundled weights/)")
    parser.add_argument("--images", nargs="+", default=None, help="photos whose features are decoded (default: examples/*.jpg)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    parser.add_argument("--products", action="store_true", help="only the step's products")
    parser.add_argument("--paths", action="store_true", help="only the decoders' paths")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from captioner import Captioner
    from captioner.decoding import limit_blas_threads

    limit_blas_threads()
    captioner = Captioner.from_pretrained(args.weights)
    results = {}
    if args.products or not args.paths:
        results["products"] = products = measure_products(captioner.step_model, args.repeats)
        columns = ["output_whole_us", *(f"output_blocks{w}_us" for w in BLOCK_WIDTHS), "recurrent_by_gate_us", "recurrent_whole_us"]
        print(f"one step's products (us), vocabulary {captioner.config.vocab_size}, {captioner.config.units} units")
        print(f"{'rows':>5}" + "".join(f"{c.removesuffix('_us'):>20}" for c in columns))
        for rows, row in products.items():
            print(f"{rows:>5}" + "".join(f"{row[c]:>20.1f}" for c in columns))
    if args.paths or not args.products:
        images = args.images or sorted(str(p) for p in (ROOT / "examples").glob("*.jpg"))
        results["paths"] = paths = measure_paths(captioner, captioner.encode(images), args.repeats)
        print(f"\none image's caption from its features (ms), {len(images)} images x {args.repeats} rounds")
        print(f"{'decoding':<10}{'one-image path':>16}{'batch bookkeeping':>19}{'saved':>8}{'in a batch of 16':>18}")
        for name, row in paths.items():
            print(f"{name:<10}{row['one_image_path_ms']:>16.2f}{row['batch_bookkeeping_ms']:>19.2f}{row['saved']:>8.0%}"
                  f"{row['in_batch_of_16_ms_per_image']:>18.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
