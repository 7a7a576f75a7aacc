"""Every training step in one command: prepare -> glove -> features -> train -> evaluate -> model card.

    python -m training.run_all [--data ../shared/flickr8k] [--work-dir artifacts] [--out weights]
        [--encoder mobilenet_v2] [--random-encoder] [--limit N] [--epochs E] [--flip] [--skip-eval] [--no-meteor]

Runs each step's own command-line entry point with the matching arguments, so
this is exactly the sequence of `python -m training.<step>` commands, in one
process. Every step resumes (features are saved in chunks, training restores
its last epoch), so re-running after an interruption continues where it
stopped. Prints how long each step took and writes it to <out>/timings.json.

--limit N keeps the first N images of each split: a smoke run of the whole
pipeline in minutes. Give such runs their own --work-dir: a work dir holds the
features of one image list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from captioner.encoder import ENCODERS
from training import evaluate, features, glove, model_card, prepare, train
from training.flickr8k import DEFAULT_DATA_DIR
from training.prepare import DEFAULT_WORK_DIR

TIMINGS_FILE = "timings.json"


class RunError(RuntimeError):
    """The run can't start; the message says why and what to do."""


def check_work_dir(work_dir: Path, encoder: str, limit: int | None, random_encoder: bool) -> None:
    """Refuse to mix two kinds of run in one work dir, before any step overwrites it.

    The features step reuses any features it finds (that is how it resumes), without checking that they
    belong to the same image list and encoder weights: a smoke run in the full run's work dir would
    otherwise train on the wrong features, or fail halfway with a missing caption.
    """
    dataset_file, features_root = work_dir / "dataset.json", work_dir / "features"
    if not (dataset_file.is_file() and features_root.is_dir()):
        return
    previous_limit = json.loads(dataset_file.read_text()).get("limit")
    if previous_limit != limit:
        images = lambda n: f"the first {n} images of each split" if n else "every image"  # noqa: E731
        raise RunError(
            f"{work_dir} holds features of {images(previous_limit)}, this run wants {images(limit)}. "
            "Use another --work-dir (e.g. artifacts-smoke for --limit runs), or delete that one to start afresh."
        )
    info_file = features.features_dir(work_dir, encoder) / "encoder.json"
    if info_file.is_file() and json.loads(info_file.read_text())["random_weights"] != random_encoder:
        weights = lambda random: "random" if random else "ImageNet"  # noqa: E731
        raise RunError(
            f"{info_file.parent} holds features of {weights(not random_encoder)} {encoder} weights, this run wants "
            f"{weights(random_encoder)} weights. Use another --work-dir, or delete that folder."
        )


def step_commands(args: argparse.Namespace) -> list[tuple[str, Callable, list[str]]]:
    """(step name, its entry point, its command-line arguments) for each step, in order."""
    work, data = ["--work-dir", str(args.work_dir)], ["--data", str(args.data)]
    limit = ["--limit", str(args.limit)] if args.limit else []
    random_encoder = ["--random-encoder"] if args.random_encoder else []
    flip = ["--flip"] if args.flip else []
    training = ["--out", str(args.out), "--encoder", args.encoder, "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), *flip]
    steps = [
        ("prepare", prepare.main, [*data, *work, "--min-count", str(args.min_count), *limit]),
        ("glove", glove.main, work),
        ("features", features.main, [*data, *work, "--encoder", args.encoder, *random_encoder, *flip]),
        ("train", train.main, [*work, *training]),
    ]
    if not args.skip_eval:
        no_meteor = ["--no-meteor"] if args.no_meteor else []
        steps.append(("evaluate", evaluate.main, ["--weights", str(args.out), *work, *no_meteor]))
    steps.append(("model_card", model_card.main, ["--weights", str(args.out)]))
    return steps


def run_all(args: argparse.Namespace) -> dict[str, float]:
    """Run the steps in order; returns each step's seconds."""
    check_work_dir(args.work_dir, args.encoder, args.limit, args.random_encoder)
    steps = step_commands(args)
    seconds: dict[str, float] = {}
    for number, (name, step_main, argv) in enumerate(steps, 1):
        print(f"\n=== step {number}/{len(steps)}: {name} (python -m training.{name} {' '.join(argv)})", flush=True)
        started = time.perf_counter()
        step_main(argv)
        seconds[name] = round(time.perf_counter() - started, 1)

    total = round(sum(seconds.values()), 1)
    options = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    timings = {"seconds": seconds, "total_seconds": total, "options": options}
    (args.out / TIMINGS_FILE).write_text(json.dumps(timings, indent=1) + "\n")
    print("\n" + timings_table(seconds, total))
    return seconds


def timings_table(seconds: dict[str, float], total: float) -> str:
    width = max(map(len, [*seconds, "total"]))
    lines = [f"{'step':<{width}}  seconds", *(f"{name:<{width}}  {s:>7.1f}" for name, s in seconds.items())]
    return "\n".join([*lines, f"{'total':<{width}}  {total:>7.1f}"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="Flickr8k folder (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="intermediate files (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("weights"), help="the weights folder to write (default: %(default)s)")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="mobilenet_v2")
    parser.add_argument("--random-encoder", action="store_true",
                        help="random encoder weights instead of ImageNet (tests only)")
    parser.add_argument("--limit", type=int, help="use only the first N images of each split (smoke runs)")
    parser.add_argument("--epochs", type=int, default=30, help="upper bound; early stopping usually ends sooner")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flip", action="store_true", help="also train on the mirrored training images")
    parser.add_argument("--min-count", type=int, default=10, help="keep words seen more than this often in training captions")
    parser.add_argument("--skip-eval", action="store_true", help="stop after training")
    parser.add_argument("--no-meteor", action="store_true", help="evaluate without METEOR (it needs Java)")
    args = parser.parse_args(argv)
    try:
        run_all(args)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
