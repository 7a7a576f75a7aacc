"""Step 3: encoder features for every image of every split, cached as .npy.

    python -m training.features [--encoder mobilenet_v2] [--random-encoder] [--work-dir artifacts]

Uses the app's own image preparation and encoder (captioner.ImageEncoder).
Writes features/<encoder>/<split>.npy (float32, one row per image) and
<split>.json (the image names, in row order). With --flip, also
train_flipped.npy: the training images mirrored, a second view of each for training. Work is saved in chunks, so an
interrupted run resumes where it stopped; missing image files are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from PIL import Image, ImageOps

from captioner.encoder import ENCODERS, ImageEncoder
from captioner.image import load_image
from training.flickr8k import DEFAULT_DATA_DIR, image_path
from training.prepare import DEFAULT_WORK_DIR

CHUNK = 256  # images per saved chunk


def features_dir(work_dir: Path, encoder: str) -> Path:
    return Path(work_dir) / "features" / encoder


def mirrored(path: Path) -> Image.Image:
    return ImageOps.mirror(load_image(path))


def extract_features(data_dir: Path, work_dir: Path, encoder_name: str, random_encoder: bool = False,
                     splits=("train", "dev", "test"), flip: bool = False):
    dataset = json.loads((work_dir / "dataset.json").read_text())
    out = features_dir(work_dir, encoder_name)
    info = {"encoder": encoder_name, "random_weights": random_encoder}
    if (out / "encoder.json").is_file() and json.loads((out / "encoder.json").read_text()) != info:
        print(f"{out} holds features of other encoder weights: computing them again")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(info) + "\n")
    encoder = None
    views = [(split, split, lambda path: path) for split in splits]
    if flip:
        views.append(("train_flipped", "train", mirrored))
    for name_on_disk, split, view in views:
        names = [n for n in dataset["splits"][split] if image_path(data_dir, n).is_file()]
        missing = len(dataset["splits"][split]) - len(names)
        if _read_names(out / f"{name_on_disk}.json") == names and (out / f"{name_on_disk}.npy").is_file():
            print(f"{name_on_disk}: cached in {out}")
            continue
        parts = out / f"{name_on_disk}.parts"
        if _read_names(parts / "names.json") != names:  # chunks of another image list: start afresh
            shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(exist_ok=True)
        (parts / "names.json").write_text(json.dumps(names) + "\n")
        chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
        with tqdm(total=len(names), desc=f"{name_on_disk} features", unit="img") as progress:
            for k, chunk in enumerate(chunks):
                part = parts / f"{k:05d}.npy"
                if not part.is_file():
                    encoder = encoder or ImageEncoder(encoder_name, weights=None if random_encoder else "imagenet")
                    np.save(part.with_suffix(".tmp.npy"), encoder([view(image_path(data_dir, n)) for n in chunk]))
                    part.with_suffix(".tmp.npy").rename(part)  # a chunk is either whole or absent
                progress.update(len(chunk))
        features = np.concatenate([np.load(parts / f"{k:05d}.npy") for k in range(len(chunks))]).astype(np.float32)
        np.save(out / f"{name_on_disk}.npy", features)
        (out / f"{name_on_disk}.json").write_text(json.dumps(names) + "\n")
        shutil.rmtree(parts)
        print(f"{name_on_disk}: {features.shape[0]} images -> {features.shape}, {missing} missing image files skipped")


def _read_names(path: Path) -> list[str] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_features(work_dir: Path, encoder: str, split: str) -> tuple[np.ndarray, list[str]]:
    out = features_dir(work_dir, encoder)
    return np.load(out / f"{split}.npy"), json.loads((out / f"{split}.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="mobilenet_v2")
    parser.add_argument("--random-encoder", action="store_true", help="random encoder weights instead of ImageNet (tests only)")
    parser.add_argument("--flip", action="store_true", help="also encode the training images mirrored (augmentation)")
    args = parser.parse_args(argv)
    extract_features(args.data, args.work_dir, args.encoder, args.random_encoder, flip=args.flip)


if __name__ == "__main__":
    main()
