"""Every training step in one command, from the images to a finished weights folder:

    prepare -> glove -> convert_encoder -> features -> train -> self_critical -> export_encoder
            -> imagenet_head -> visual -> export_decoder -> evaluate -> model_card

    python -m training.run_all [--data ../shared/flickr8k] [--work-dir artifacts] [--out weights] [--flip]
        [--encoder efficientnet_lite0] [--random-encoder] [--limit N] [--epochs E] [--scst-epochs S] [--seed N] [--skip-eval]
    python -m training.run_all --dataset karpathy --data dataset_flickr30k.json --images flickr30k-images --work-dir artifacts-f30k --out weights-f30k
    python -m training.run_all --dataset csv --data captions.csv --images photos --init-from weights --out weights-mine

--dataset says what --data is: Flickr8k's folder (the default), Karpathy's split JSON, COCO's captions JSON or a
CSV/TSV of image,caption rows (training/datasets.py); files without splits get --split-file's or a seeded split.
--init-from fine-tunes a weights folder instead of training from random weights (training/finetune.py): its
vocabulary grows by the new data's frequent words, its own encoder computes the features, cross-entropy training
starts from its weights at a tenth of the learning rate. The bundled models are `--flip` runs: cross-entropy on the
training photos and on their mirror images (README, *Training on mirrored photos*).

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
from captioner.weights import WeightsError, read_folder
from training import (convert_encoder, evaluate, export_decoder, export_encoder, features, finetune, glove, model_card, prepare,
                      scst, train, visual)
from training.config import option, parse_config
from training.convert_encoder import ConversionError
from training.datasets import KINDS, DatasetError
from training.finetune import FineTuningError
from training.prepare import WorkDirError

TIMINGS_FILE = "timings.json"


@dataclass(frozen=True)
class RunConfig:
    data: Path = option(prepare.PrepareConfig.data, "the Flickr8k folder, or the caption file of --dataset karpathy, coco or csv")
    work_dir: Path = option(prepare.PrepareConfig.work_dir, "intermediate files (dataset, features, training state)")
    out: Path = option(train.TrainConfig.out, "the weights folder to write")
    dataset: str = option(prepare.PrepareConfig.dataset, "what --data is (see training/datasets.py)", choices=KINDS)
    images: Path | None = option(None, "the images folder (default: Flickr8k's images/, or the caption file's folder)")
    split_file: Path | None = option(None, "coco or csv files without splits: lines `IMAGE SPLIT` (default: a seeded split)")
    dev_fraction: float = option(prepare.PrepareConfig.dev_fraction, "a seeded split's share of dev images")
    test_fraction: float = option(prepare.PrepareConfig.test_fraction, "a seeded split's share of test images")
    split_seed: int = option(prepare.PrepareConfig.split_seed, "a seeded split's seed")
    init_from: Path | None = option(None, "fine-tune this weights folder (e.g. weights) instead of training from scratch")
    encoder: str = option(train.TrainConfig.encoder, "the image encoder (with --init-from: the folder's)", choices=sorted(ENCODERS))
    random_encoder: bool = option(False, "random encoder weights instead of ImageNet (tests only)")
    limit: int | None = option(None, "use only the first N images of each split (smoke runs)")
    min_count: int = option(prepare.PrepareConfig.min_count, "keep words seen more than this often in training captions")
    epochs: int = option(train.TrainConfig.epochs, "cross-entropy epochs at most; early stopping usually ends sooner")
    batch_size: int = option(train.TrainConfig.batch_size, "captions per cross-entropy batch")
    patience: int = option(train.TrainConfig.patience, "cross-entropy epochs without a better dev CIDEr before stopping")
    learning_rate: float | None = option(None, f"cross-entropy's Adam learning rate (default: {train.TrainConfig.learning_rate:g}, "
                                               f"fine-tuning {finetune.LEARNING_RATE:g})")
    flip: bool = option(False, "also train on the mirrored training images")
    seed: int = option(train.TrainConfig.seed, "seeds both trainings (weights, batches, samples): runs that differ only "
                                               "by it are an ensemble's members (training/evaluate_ensemble.py)")
    scst_epochs: int = option(scst.SelfCriticalConfig.epochs, "self-critical epochs at most; 0 skips self-critical training")
    workers: int | None = option(None, "threads decoding images for the features (default: one per CPU)")
    skip_eval: bool = option(False, "stop after training")
    encoder_precision: str = option("int8", "the OpenVINO encoder the folder serves (EfficientNet-Lite folders; see "
                                    "training/export_encoder.py); none: converted from Keras when first served",
                                    choices=["int8", "f16", "none"])
    no_meteor: bool = option(False, "evaluate without METEOR (it needs Java)")
    decoder_precision: str = option("int8", "the decoder step the folder serves (training/export_decoder.py); float32: "
                                    "NumPy's, no decoder.onnx", choices=["int8", "float32"])


def steps(run: RunConfig) -> list[tuple[str, callable, object]]:
    """(step name, its function, its config) for each step, in order."""
    out, work = run.out, run.work_dir
    encoder, encoder_file, learning_rate = run.encoder, None, run.learning_rate or train.TrainConfig.learning_rate
    if run.init_from is not None:  # the folder's network, on features of its own encoder
        folder = read_folder(run.init_from)
        encoder, learning_rate = folder.config.encoder, run.learning_rate or finetune.LEARNING_RATE
        encoder_file = folder.encoder_file
        if (folder.encoder_weights == "random") != run.random_encoder:
            raise FineTuningError(f"{run.init_from} was trained on features of a {folder.encoder_weights} {encoder}: "
                                  f"{'leave out' if run.random_encoder else 'add'} --random-encoder.")
    planned = [
        ("prepare", prepare.prepare, prepare.PrepareConfig(
            run.data, work, run.min_count, run.limit, run.dataset, run.images, run.split_file, run.dev_fraction,
            run.test_fraction, run.split_seed, run.init_from)),
        ("glove", glove.write_embedding_matrix, glove.GloveConfig(work)),
    ]
    if encoder in convert_encoder.WHEELS and not run.random_encoder and encoder_file is None:
        planned.append(("convert_encoder", convert_encoder.convert, convert_encoder.ConvertConfig(encoder, work)))
    planned += [
        ("features", features.extract_features, features.FeaturesConfig(work, encoder, run.random_encoder, run.flip,
                                                                         encoder_file, run.workers)),
        ("train", train.train, train.TrainConfig(work, out, encoder, run.epochs, run.batch_size, run.patience, flip=run.flip,
                                                 learning_rate=learning_rate, seed=run.seed, init_from=run.init_from)),
    ]
    if run.scst_epochs:
        planned.append(("self_critical", scst.self_critical, scst.SelfCriticalConfig(work, out, out, epochs=run.scst_epochs,
                                                                                     seed=run.seed)))
    # The folder's encoder as an OpenVINO model (int8 by default), for the folders that carry their encoder's weights.
    if run.encoder_precision != "none" and not run.random_encoder and (encoder in convert_encoder.WHEELS or encoder_file):
        planned.append(("export_encoder", export_encoder.export, export_encoder.ExportConfig(out, work, run.encoder_precision)))
    # What the encoder sees (EfficientNet-Lite, whose classifier comes with its weights): the ImageNet head, then the
    # classes' caption words and the familiarity flag, chosen on dev with the served encoder (training/visual.py).
    if encoder in convert_encoder.WHEELS and not run.random_encoder and not run.skip_eval:
        planned.append(("imagenet_head", convert_encoder.export_head,
                        convert_encoder.ConvertConfig(encoder, work, head_into=out)))
        planned.append(("visual", visual.build, visual.VisualConfig(out, work)))
    # The decoder's step in int8 (after the visual words: its graph holds the words they add).
    if run.decoder_precision == "int8":
        planned.append(("export_decoder", export_decoder.export, export_decoder.ExportDecoderConfig(out, work)))
    # Scored last, so that metrics.json is the folder's as it serves: naming what the classifier sees, the int8 step.
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
    except (WorkDirError, ConversionError, DatasetError, FineTuningError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
