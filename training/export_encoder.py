"""Step 9: the serving encoder as an OpenVINO model (IR) in the weights folder, float16 or int8.

    python -m training.export_encoder --weights weights [--work-dir artifacts] [--precision int8|f16]
    python -m training.export_encoder --weights weights --precision int8 --evaluate   # + dev/test CIDEr, f32 vs int8

With `encoder.xml` + `encoder.bin` in the folder (checksummed in config.json like every file), no serving process
converts anything: the encoder is compiled from the folder's IR, and serving needs neither TensorFlow nor Keras
(captioner/backends.py). Without them (older folders, keras.applications encoders) the Keras encoder is converted on
first use, as before.

- `f16`: the Keras encoder (the folder's encoder.weights.h5, itself float16 values) converted and stored with
  OpenVINO's compress_to_fp16: the same numbers as converting at load time in float32 (weights that are float16
  values round-trip exactly), in half the bytes.
- `int8`: the f16 model quantized with NNCF's post-training quantization (preset PERFORMANCE, default fast bias
  correction) on `--calibration-images` training-split photos, chosen with `--seed` (reproducible: the same photos
  in the same order). The quantized features are checked against float32 on the dev split (cosine); `--evaluate`
  also scores the folder's decoder on dev and test with int8 and float32 features (the app's decoding) and writes
  the comparison to <work-dir>/encoder_export.json.

Training never uses these files: its features stay float32 (training/features.py), the reference.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner.backends import OpenVINOBackend, _convert, _with_pooling, import_openvino
from captioner.encoder import ENCODERS, ImageEncoder
from captioner.image import prepare_pixels
from captioner.weights import BUNDLED_WEIGHTS, ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE, read_folder, sha256
from training.config import option, parse_config
from training.prepare import DEFAULT_WORK_DIR

MAX_FILE_BYTES = 10 * 2**20  # the Hub's limit without Git LFS


@dataclass
class ExportConfig:
    weights: Path = option(BUNDLED_WEIGHTS, "the weights folder whose encoder is exported (the IR is added to it)")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (dataset.json: the calibration photos)")
    precision: str = option("int8", "what the folder serves", choices=["int8", "f16"])
    calibration_images: int = option(300, "training photos NNCF calibrates int8 on")
    check_images: int = option(1000, "dev photos the int8 features are compared with float32 on")
    seed: int = option(1234, "chooses the calibration photos")
    evaluate: bool = option(False, "also score the decoder on dev and test with int8 and float32 features")


def keras_encoder(folder) -> object:
    """The folder's Keras encoder (pixels -> last feature map), as serving built it to convert it at load time."""
    weights = None if folder.encoder_weights == "random" else folder.encoder_file or "imagenet"
    encoder = ImageEncoder.__new__(ImageEncoder)  # the Keras model only: no backend compiled
    encoder.name, encoder.spec, encoder.weights = folder.config.encoder, ENCODERS[folder.config.encoder], weights
    return encoder.feature_map_model


def split_images(work_dir: Path, split: str) -> list[Path]:
    dataset = json.loads((Path(work_dir) / "dataset.json").read_text())
    images = Path(dataset["dataset"]["images_folder"])
    return [images / name for name in dataset["splits"][split] if (images / name).is_file()]


def calibration_images(work_dir: Path, count: int, seed: int) -> list[Path]:
    names = sorted(split_images(work_dir, "train"))
    return random.Random(seed).sample(names, min(count, len(names)))


def pixels_of(paths: list[Path], spec) -> np.ndarray:
    """Preprocessed float32 pixels, as ImageEncoder.encode_pixels gives the backend."""
    return spec.preprocess_input(np.stack([prepare_pixels(p, spec.input_size) for p in paths]).astype(np.float32))


def quantize(model, paths: list[Path], spec):
    """NNCF post-training int8 quantization of an OpenVINO model, calibrated on `paths` one photo at a time."""
    import nncf

    data = nncf.Dataset(paths, lambda path: pixels_of([path], spec))
    return nncf.quantize(model, data, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(paths))


def encode_all(backend, paths: list[Path], spec, batch: int = 8) -> np.ndarray:
    return np.concatenate([backend(pixels_of(paths[i : i + batch], spec)) for i in range(0, len(paths), batch)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def export(config: ExportConfig) -> dict:
    ov = import_openvino()
    folder = read_folder(config.weights)
    spec = ENCODERS[folder.config.encoder]
    started = time.time()
    keras_model = keras_encoder(folder)
    report = {"settings": {k: str(v) for k, v in asdict(config).items()}, "encoder": folder.config.encoder}
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        model = _convert(_with_pooling(keras_model))  # what serving converted: pixels -> (pooled, maps)
        f32 = OpenVINOBackend(keras_model, cache_dir=staging / "cache")  # today's path: converted at load, float32
        if config.precision == "int8":
            calibration = calibration_images(config.work_dir, config.calibration_images, config.seed)
            report["calibration_images"] = len(calibration)
            model = quantize(model, calibration, spec)
        ov.save_model(model, str(staging / ENCODER_IR_FILE), compress_to_fp16=True)
        report["export_seconds"] = round(time.time() - started, 1)
        served = OpenVINOBackend(None, ir=staging / ENCODER_IR_FILE)
        for name in (ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE):
            size = (staging / name).stat().st_size
            report[f"{name}_bytes"] = size
            if size > MAX_FILE_BYTES:
                raise RuntimeError(f"{name} takes {size / 2**20:.1f} MiB, over the Hub's 10 MiB rule: declare it for Git LFS.")
        check = split_images(config.work_dir, "dev")[: config.check_images] if config.check_images else []
        if check:
            ours, reference = encode_all(served, check, spec), encode_all(f32, check, spec)
            cos = cosines(ours, reference)
            report["dev_check"] = {"images": len(check), "cosine_mean": round(float(cos.mean()), 4),
                                   "cosine_min": round(float(cos.min()), 4),
                                   "max_abs_diff": float(np.abs(ours - reference).max())}
            print(f"{config.precision} vs float32 features on {len(check)} dev photos: cosine mean {cos.mean():.4f}, "
                  f"min {cos.min():.4f}, max |diff| {np.abs(ours - reference).max():.4g}")
        if config.evaluate:
            report["scores"] = score_both(folder, config.work_dir, served, f32, spec)
        add_to_folder(folder.path, staging, config.precision)
    out = Path(config.work_dir) / "encoder_export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{folder.path / ENCODER_IR_FILE} ({config.precision}) written; report in {out}")
    return report


def add_to_folder(folder: Path, staging: Path, precision: str) -> None:
    """Copy encoder.xml/.bin into the folder and list their checksums (and precision) in its config.json, every
    other file and setting as it was."""
    path = folder / "config.json"
    content = json.loads(path.read_text())
    for name in (ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE):
        shutil.copyfile(staging / name, folder / name)
        content["files"][name] = sha256(folder / name)
    content["encoder_ir_precision"] = precision
    path.write_text(json.dumps(content, indent=2) + "\n")


def score_both(folder, work_dir: Path, served, f32, spec) -> dict:
    """The folder's decoder (the app's decoding) on dev and test, with the served IR's features and float32's."""
    from captioner import Captioner
    from training.evaluate import RECOMMENDED_LABEL, SETTINGS, coco_scores

    captioner = Captioner.from_folder(folder)
    dataset = json.loads((Path(work_dir) / "dataset.json").read_text())
    scores = {}
    for split in ("dev", "test"):
        paths = split_images(work_dir, split)
        references = {p.name: dataset["splits"][split][p.name] for p in paths}
        features = {"served": encode_all(served, paths, spec), "float32": encode_all(f32, paths, spec)}
        texts = {}
        for label, values in features.items():
            captions = captioner.caption_features(values, SETTINGS[RECOMMENDED_LABEL])
            texts[label] = {p.name: c.text for p, c in zip(paths, captions)}
            both = coco_scores(references, texts[label])
            scores[f"{split}_{label}"] = {k: round(float(both[k]), 4) for k in ("CIDEr", "BLEU-4")}
        cos = cosines(features["served"], features["float32"])
        scores[f"{split}_cosine_mean"], scores[f"{split}_cosine_min"] = round(float(cos.mean()), 4), round(float(cos.min()), 4)
        scores[f"{split}_captions_differing"] = sum(texts["served"][k] != texts["float32"][k] for k in texts["served"])
        print(split, {k: v for k, v in scores.items() if k.startswith(split)})
    return scores


def without_openvino_model(folder: Path, into: Path) -> Path:
    """A copy of a weights folder without its encoder.xml/.bin: an older folder's layout (tests, benchmarks.speed)."""
    copy = Path(shutil.copytree(folder, into))
    config = json.loads((copy / "config.json").read_text())
    for name in (ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE):
        (copy / name).unlink(missing_ok=True)
        config["files"].pop(name, None)
    config.pop("encoder_ir_precision", None)
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def main(argv=None):
    export(parse_config(ExportConfig, argv, __doc__))


if __name__ == "__main__":
    main()
