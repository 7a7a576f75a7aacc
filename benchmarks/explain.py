"""What explaining a caption costs: `Captioner.explain()` against `Captioner.caption()` on the same photos.

    python -m benchmarks.explain [--weights weights] [--images examples/*.jpg] [--repeats 10] [--json PATH]

--weights may be an ensemble's folder: `--weights weights/ensemble-lite1` times the page's default, whose explain()
is the ensemble's caption explained through its Lite0 member.

Both run from the image file to the result: decoding the file, the encoder, the decoder; explain() also
returns the encoder's feature map, re-reads the caption through the LSTM and computes each word's
gradient and heatmap. They are timed interleaved (caption, explain, caption, ...), after a warm-up, so
that background load hits both alike; the figure is the ratio of their medians, per decoding setting.
Drawing one word's overlay (what the page does on a click) is timed on its own.

Both give the caption's objects and familiarity (the ImageNet head's product and the nearness to the training
photos), and with the recommended decoding name what the classifier is sure of. "plain" is caption() without
naming objects (name_objects=False), timed in the same rounds: the cost of a caption before issue 23.

Targets: explain() at most 1.2x caption() (issue 12); explaining and tagging together at most 1.2x a plain
caption (issue 23). The exit status is 0 unless --strict is given and a target fails: timings on a busy machine
are noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_EXPLAIN_VS_CAPTION = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="weights folder (default: the bundled weights/)")
    parser.add_argument("--images", nargs="+", default=None, help="photos (default: examples/*.jpg)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds over the photos (default 10)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the target fails")
    return parser.parse_args(argv)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1000.0


def main(argv=None) -> int:
    args = parse_args(argv)
    from captioner import DecodingOptions
    from captioner.decoding import limit_blas_threads
    from captioner.ensemble import load_model

    limit_blas_threads()  # as the app and the CLI do
    captioner = load_model(args.weights)  # a Captioner, or an Ensemble
    images = args.images or sorted(str(p) for p in (ROOT / "examples").glob("*.jpg"))
    settings = {"greedy": DecodingOptions("greedy"), "beam5_lp2 (recommended)": DecodingOptions()}

    results = {}
    for name, options in settings.items():
        for image in images:  # warm-up: traces the encoder graphs, fills the caches
            captioner.caption(image, options)
            captioner.explain(image, options=options)
        plain = dataclasses.replace(options, name_objects=False)
        caption_ms, explain_ms, plain_ms = [], [], []
        for _ in range(args.repeats):
            for image in images:
                caption_ms.append(timed(lambda: captioner.caption(image, options)))
                explain_ms.append(timed(lambda: captioner.explain(image, options=options)))
                plain_ms.append(timed(lambda: captioner.caption(image, plain)))
        caption_p50, explain_p50, plain_p50 = (statistics.median(t) for t in (caption_ms, explain_ms, plain_ms))
        results[name] = {"caption_p50_ms": round(caption_p50, 2), "explain_p50_ms": round(explain_p50, 2),
                         "plain_caption_p50_ms": round(plain_p50, 2),
                         "explain_vs_caption": round(explain_p50 / caption_p50, 3),
                         "explain_vs_plain_caption": round(explain_p50 / plain_p50, 3)}

    explanation = captioner.explain(images[0])
    overlay_ms = statistics.median(timed(lambda: explanation.overlay(1)) for _ in range(20))
    results["overlay_one_word_ms"] = round(overlay_ms, 2)
    results["overlay_size"] = list(explanation.image.size)

    results["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine slow both alike
    print(f"explain() vs caption(), {len(images)} photos x {args.repeats} rounds, medians ({args.weights}; "
          f"load average {results['load_average_1min']} on {os.cpu_count()} CPUs):")
    print(f"{'decoding':<26}{'plain':>10}{'caption()':>12}{'explain()':>12}{'vs caption':>12}{'vs plain':>10}   "
          f"target <= {TARGET_EXPLAIN_VS_CAPTION}x")
    passed = True
    for name in settings:
        r = results[name]
        ok = max(r["explain_vs_caption"], r["explain_vs_plain_caption"]) <= TARGET_EXPLAIN_VS_CAPTION
        passed &= ok
        print(f"{name:<26}{r['plain_caption_p50_ms']:>8.1f}ms{r['caption_p50_ms']:>10.1f}ms{r['explain_p50_ms']:>10.1f}ms"
              f"{r['explain_vs_caption']:>11.2f}x{r['explain_vs_plain_caption']:>9.2f}x   {'PASS' if ok else 'FAIL'}")
    print(f"drawing one word's overlay ({results['overlay_size'][0]}x{results['overlay_size'][1]}): {overlay_ms:.1f} ms")
    results["target_pass"] = passed
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if args.strict and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
