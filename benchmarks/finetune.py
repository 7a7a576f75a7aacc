"""Does fine-tuning on a few hundred captioned photos help on their domain, and what does it cost on Flickr8k?

    python -m benchmarks.finetune [--data ../shared/coco-dev/captions.tsv] [--images ../shared/coco-dev/images]
                                  [--weights weights] [--work-dir artifacts-finetune] [--json PATH] [run_all's flags]

Fine-tunes the bundled model on a seeded part of the photos (`python -m training.run_all --dataset csv
--init-from weights`, its options printed; other flags go to run_all, e.g. `--learning-rate 1e-3 --patience 3`),
then scores the model before and after with the app's default decoding: CIDEr (and BLEU-4) on the photos held out
(the split's test images) and on the Flickr8k dev split. Also measures the features step's pipeline (decoding
threads feeding the encoder) on the full-size photos among them, read 3 times over, the encoder already loaded: the
images per second the README's COCO estimate extrapolates. Writes the figures to --json (default:
<work-dir>/finetune.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from captioner import Captioner
from captioner.encoder import BATCH_SIZE, ImageEncoder
from captioner.weights import BUNDLED_WEIGHTS, read_folder
from training import run_all
from training.evaluate import coco_scores
from training.features import FeaturesConfig, encode_as_decoded, extract_features, load_features, read_pixels
from training.flickr8k import DEFAULT_DATA_DIR
from training.prepare import PrepareConfig, prepare

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
# The fine-tuning recipe measured: 30% of the photos held out for test, 10% for early stopping, words seen more than
# 4 times in the others' captions added (a few hundred photos have few words seen more than the default 10 times).
RECIPE = ["--dataset", "csv", "--dev-fraction", "0.1", "--test-fraction", "0.3", "--min-count", "4",
          "--scst-epochs", "0", "--no-meteor"]


def scores(weights: Path, work_dir: Path, split: str) -> dict[str, float]:
    """CIDEr and BLEU-4 of `weights`' captions (the default decoding) of the split's images in `work_dir`."""
    captioner = Captioner.from_pretrained(weights)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    features, names = load_features(work_dir, captioner.config.encoder, split)
    hypotheses = {name: caption.text for name, caption in zip(names, captioner.caption_features(features))}
    result = coco_scores({name: dataset["splits"][split][name] for name in names}, hypotheses)
    return {"CIDEr": round(result["CIDEr"], 3), "BLEU-4": round(result["BLEU-4"], 3), "images": len(names)}


def features_rate(encoder: ImageEncoder, images: Path, workers: int | None = None) -> dict:
    """Images per second through the features step's pipeline on the full-size photos in `images` (COCO's are
    640 px; those squashed to 256 px would flatter the decoding)."""
    photos = [p for p in sorted(images.iterdir()) if max(Image.open(p).size) > 256] * 3
    encoder.encode_pixels(np.zeros((BATCH_SIZE, *encoder.input_size[::-1], 3), np.uint8))  # built, and warm
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as readers:
        started = time.perf_counter()
        encode_as_decoded(encoder, [readers.submit(read_pixels, photo, encoder.input_size) for photo in photos])
        seconds = time.perf_counter() - started
    return {"images": len(photos), "workers": workers, "seconds": round(seconds, 1),
            "images_per_second": round(len(photos) / seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "coco-dev" / "captions.tsv")
    parser.add_argument("--images", type=Path, default=SHARED / "coco-dev" / "images")
    parser.add_argument("--flickr8k", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS, help="the model to fine-tune")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts-finetune"))
    parser.add_argument("--json", type=Path)
    args, run_all_flags = parser.parse_known_args(argv)
    work, out, flickr_work = args.work_dir / "work", args.work_dir / "weights", args.work_dir / "flickr8k"

    folder = read_folder(args.weights)
    encoder = folder.config.encoder
    rate = features_rate(ImageEncoder(encoder, weights=folder.encoder_file), args.images)

    argv = [*RECIPE, "--data", str(args.data), "--images", str(args.images), "--init-from", str(args.weights),
            "--work-dir", str(work), "--out", str(out), *run_all_flags]
    print("python -m training.run_all " + " ".join(argv), flush=True)
    if run_all.main(argv) != 0:
        return 1

    prepare(PrepareConfig(args.flickr8k, flickr_work))
    extract_features(FeaturesConfig(flickr_work, encoder, encoder_file=folder.encoder_file), splits=("dev",))
    report = {
        "command": "python -m training.run_all " + " ".join(argv),
        "held_out": {"before": scores(args.weights, work, "test"), "after": scores(out, work, "test")},
        "flickr8k_dev": {"before": scores(args.weights, flickr_work, "dev"), "after": scores(out, flickr_work, "dev")},
        "words_added": json.loads((work / "dataset.json").read_text())["vocabulary"]["added_words"],
        "features": rate,
        "training": json.loads((out / "config.json").read_text())["training"],
    }
    path = args.json or args.work_dir / "finetune.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for where in ("held_out", "flickr8k_dev"):
        before, after = report[where]["before"], report[where]["after"]
        print(f"{where} ({before['images']} images): CIDEr {before['CIDEr']:.3f} -> {after['CIDEr']:.3f}, "
              f"BLEU-4 {before['BLEU-4']:.3f} -> {after['BLEU-4']:.3f}")
    print(f"features: {report['features']['images_per_second']} images/s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
