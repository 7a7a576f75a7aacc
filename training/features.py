"""Step 3: encoder features for every image of every split, cached as .npy.

    python -m training.features [--encoder mobilenet_v2] [--random-encoder] [--work-dir artifacts]

Uses the app's own image preparation and encoder (captioner.ImageEncoder).
Writes features/<encoder>/<split>.npy (float32, one row per image) and
<split>.json (the image names, in row order). Work is saved in chunks, so an
interrupted run resumes where it stopped; missing image files are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.encoder import ENCODERS, ImageEncoder
from training.flickr8k import DEFAULT_DATA_DIR, image_path
from training.prepare import DEFAULT_WORK_DIR

CHUNK = 256  # images per saved chunk


def features_dir(work_dir: Path, encoder: str) -> Path:
    return Path(work_dir) / "features" / encoder


def extract_features(data_dir: Path, work_dir: Path, encoder_name: str, random_encoder: bool = False, splits=("train", "dev", "test")):
    dataset = json.loads((work_dir / "dataset.json").read_text())
    out = features_dir(work_dir, encoder_name)
    out.mkdir(parents=True, exist_ok=True)
    encoder = None
    for split in splits:
        if (out / f"{split}.npy").is_file() and (out / f"{split}.json").is_file():
            print(f"{split}: cached in {out}")
            continue
        names = [n for n in dataset["splits"][split] if image_path(data_dir, n).is_file()]
        missing = len(dataset["splits"][split]) - len(names)
        parts = out / f"{split}.parts"
        parts.mkdir(exist_ok=True)
        chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
        with tqdm(total=len(names), desc=f"{split} features", unit="img") as progress:
            for k, chunk in enumerate(chunks):
                part = parts / f"{k:05d}.npy"
                if not part.is_file():
                    encoder = encoder or ImageEncoder(encoder_name, weights=None if random_encoder else "imagenet")
                    np.save(part.with_suffix(".tmp.npy"), encoder([image_path(data_dir, n) for n in chunk]))
                    part.with_suffix(".tmp.npy").rename(part)  # a chunk is either whole or absent
                progress.update(len(chunk))
        features = np.concatenate([np.load(parts / f"{k:05d}.npy") for k in range(len(chunks))]).astype(np.float32)
        np.save(out / f"{split}.npy", features)
        (out / f"{split}.json").write_text(json.dumps(names) + "\n")
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()
        print(f"{split}: {features.shape[0]} images -> {features.shape}, {missing} missing image files skipped")
    (out / "encoder.json").write_text(json.dumps({"encoder": encoder_name, "random_weights": random_encoder}) + "\n")


def load_features(work_dir: Path, encoder: str, split: str) -> tuple[np.ndarray, list[str]]:
    out = features_dir(work_dir, encoder)
    return np.load(out / f"{split}.npy"), json.loads((out / f"{split}.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="mobilenet_v2")
    parser.add_argument("--random-encoder", action="store_true", help="random encoder weights instead of ImageNet (tests only)")
    args = parser.parse_args(argv)
    extract_features(args.data, args.work_dir, args.encoder, args.random_encoder)


if __name__ == "__main__":
    main()
