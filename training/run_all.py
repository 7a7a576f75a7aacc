"""Every training step in one command, from the images to a finished weights folder:

    prepare -> glove -> convert_encoder -> features -> train -> self_critical -> evaluate -> model_card

    python -m training.run_all [--data ../shared/flickr8k] [--work-dir artifacts] [--out weights]
        [--encoder efficientnet_lite0] [--random-encoder] [--limit N] [--epochs E] [--scst-epochs S] [--skip-eval]

Each step is called with its own config dataclass, built from this run's options (whose defaults are the
steps' own). Every step resumes (features are saved in chunks, both trainings restore their last epoch), so
re-running after an interruption continues where it stopped; a work dir holding another run's files is
refused with a sentence (training.prepare.WorkDirError). Prints how long each step took and writes it to
<out>/timings.json.

--limit N keeps the first N images of each split: a smoke run of the whole pipeline in minutes. Give such
runs their own --work-dir.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.encoder import ENCODERS
from training import convert_encoder, evaluate, features, glove, model_card, prepare, scst, train
from training.config import option, parse_config
from training.convert_encoder import ConversionError
from training.prepare import WorkDirError

TIMINGS_FILE = "timings.json"


@dataclass(frozen=True)
class RunConfig:
    data: Path = option(prepare.PrepareConfig.data, "the Flickr8k folder")
    work_dir: Path = option(prepare.PrepareConfig.work_dir, "intermediate files (dataset, features, training state)")
    out: Path = option(train.TrainConfig.out, "the weights folder to write")
    encoder: str = option(train.TrainConfig.encoder, "the image encoder", choices=sorted(ENCODERS))
    random_encoder: bool = option(False, "random encoder weights instead of ImageNet (tests only)")
    limit: int | None = option(None, "use only the first N images of each split (smoke runs)")
    min_count: int = option(prepare.PrepareConfig.min_count, "keep words seen more than this often in training captions")
    epochs: int = option(train.TrainConfig.epochs, "cross-entropy epochs at most; early stopping usually ends sooner")
    batch_size: int = option(train.TrainConfig.batch_size, "captions per cross-entropy batch")
    flip: bool = option(False, "also train on the mirrored training images")
    scst_epochs: int = option(scst.SelfCriticalConfig.epochs, "self-critical epochs at most; 0 skips self-critical training")
    skip_eval: bool = option(False, "stop after training")
    no_meteor: bool = option(False, "evaluate without METEOR (it needs Java)")


def steps(run: RunConfig) -> list[tuple[str, callable, object]]:
    """(step name, its function, its config) for each step, in order."""
    out, work = run.out, run.work_dir
    planned = [
        ("prepare", prepare.prepare, prepare.PrepareConfig(run.data, work, run.min_count, run.limit)),
        ("glove", glove.write_embedding_matrix, glove.GloveConfig(work)),
    ]
    if run.encoder in convert_encoder.WHEELS and not run.random_encoder:
        planned.append(("convert_encoder", convert_encoder.convert, convert_encoder.ConvertConfig(run.encoder, work)))
    planned += [
        ("features", features.extract_features, features.FeaturesConfig(run.data, work, run.encoder, run.random_encoder, run.flip)),
        ("train", train.train, train.TrainConfig(work, out, run.encoder, run.epochs, run.batch_size, flip=run.flip)),
    ]
    if run.scst_epochs:
        planned.append(("self_critical", scst.self_critical, scst.SelfCriticalConfig(work, out, out, epochs=run.scst_epochs)))
    if not run.skip_eval:
        planned.append(("evaluate", evaluate.evaluate, evaluate.EvaluateConfig(out, work, no_meteor=run.no_meteor)))
    planned.append(("model_card", model_card.write_model_card, out))
    return planned


def run_all(run: RunConfig) -> dict[str, float]:
    """Run the steps in order; returns each step's seconds."""
    planned = steps(run)
    seconds: dict[str, float] = {}
    for number, (name, step, config) in enumerate(planned, 1):
        print(f"\n=== step {number}/{len(planned)}: {name} ({config})", flush=True)
        started = time.perf_counter()
        step(config)
        seconds[name] = round(time.perf_counter() - started, 1)

    total = round(sum(seconds.values()), 1)
    timings = {"seconds": seconds, "total_seconds": total, "options": json.loads(json.dumps(asdict(run), default=str))}
    (Path(run.out) / TIMINGS_FILE).write_text(json.dumps(timings, indent=1) + "\n")
    print("\n" + timings_table(seconds, total))
    return seconds


def timings_table(seconds: dict[str, float], total: float) -> str:
    width = max(map(len, [*seconds, "total"]))
    lines = [f"{'step':<{width}}  seconds", *(f"{name:<{width}}  {s:>7.1f}" for name, s in seconds.items())]
    return "\n".join([*lines, f"{'total':<{width}}  {total:>7.1f}"])


def main(argv=None) -> int:
    try:
        run_all(parse_config(RunConfig, argv, __doc__))
    except (WorkDirError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
