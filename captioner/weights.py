"""The weights folder: what training writes, the Hub repo holds and the app loads.

    config.json          model config, special tokens, sha256 of each file below
    vocab.json           the vocabulary (ids in order)
    decoder.weights.h5   the caption model's weights (Keras .weights.h5: arrays only, no code, no pickle)
    encoder.weights.h5   optional: the image encoder's weights, for encoders keras.applications lacks
                         (EfficientNet-Lite, converted by training/convert_encoder.py); checksummed too
    encoder_head.weights.h5  optional: the encoder's ImageNet classifier and its 1,000 class names (the photo's
                         objects; training/convert_encoder.py --head-into); checksummed
    visual.json, visual.weights.h5  optional: the familiarity flag's summary of the training photos and the
                         classes' caption words (training/visual.py); checksummed
    encoder.xml, encoder.bin  optional: the image encoder as an OpenVINO model (float16 or int8), which serving
                         runs without converting anything or Keras (training/export_encoder.py); checksummed
    decoder.onnx         optional: the decoder's step with int8 weights, which serving runs on ONNX Runtime
                         (training/export_decoder.py; model.Int8StepModel); checksummed, and made from this folder's
                         decoder and visual words (it names their checksums: a stale one is not used)
    metrics.json         optional: test-split scores
    README.md, *.png     optional: model card and training plot

Without encoder.weights.h5 (folders of keras.applications encoders), the encoder's
ImageNet weights are not in the folder: Keras loads them from ~/.keras/models/
(downloading them there once if missing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model import ModelConfig
from .vocabulary import SPECIAL_TOKENS, Vocabulary

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "decoder.weights.h5"
METRICS_FILE, METRICS_TABLE_FILE, CARD_FILE, HISTORY_FILE = "metrics.json", "metrics.md", "README.md", "history.json"
CHECKSUMMED_FILES = (VOCAB_FILE, WEIGHTS_FILE)
ENCODER_WEIGHTS_FILE = "encoder.weights.h5"  # optional; checksummed when present
HEAD_FILE = "encoder_head.weights.h5"  # optional; checksummed when present
VISUAL_SETTINGS_FILE, VISUAL_WEIGHTS_FILE = "visual.json", "visual.weights.h5"  # optional, together; checksummed
ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE = "encoder.xml", "encoder.bin"  # optional, together; checksummed
DECODER_STEP_FILE = "decoder.onnx"  # optional; checksummed
# What a folder may hold beside the required files: each is trusted only if config.json lists its checksum.
OPTIONAL_CHECKSUMMED_FILES = (ENCODER_WEIGHTS_FILE, HEAD_FILE, VISUAL_SETTINGS_FILE, VISUAL_WEIGHTS_FILE)
OPTIONAL_CHECKSUMMED_FILES += (ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE, DECODER_STEP_FILE)
# What decoder.onnx is made from beside the decoder's weights (new weights come with write_config, which removes
# every optional file): when add_files brings a new one, the folder's decoder.onnx goes.
DECODER_STEP_SOURCES = (VISUAL_WEIGHTS_FILE,)
# Every file a weights folder holds: what training.push uploads and the app downloads from the Hub
# (never training's work files or caption dumps).
FOLDER_FILES = [CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, ENCODER_WEIGHTS_FILE, HEAD_FILE, VISUAL_SETTINGS_FILE,
                VISUAL_WEIGHTS_FILE, METRICS_FILE, METRICS_TABLE_FILE, CARD_FILE, HISTORY_FILE, "*.png"]
FOLDER_FILES += [ENCODER_IR_FILE, ENCODER_IR_WEIGHTS_FILE, DECODER_STEP_FILE]
# The repository's own weights/ folder: the bundled model, and where training writes by default.
# `pip install .` puts a copy inside the package (see pyproject.toml).
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
if not BUNDLED_WEIGHTS.is_dir() and (Path(__file__).resolve().parent / "bundled_weights").is_dir():
    BUNDLED_WEIGHTS = Path(__file__).resolve().parent / "bundled_weights"
FORMAT_VERSION = 1


class WeightsError(RuntimeError):
    """Weights can't be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class WeightsFolder:
    path: Path
    config: ModelConfig
    encoder_weights: str  # "imagenet", or "random" (tests and --random-encoder recipes only)
    source: str  # where it came from, for the user: "bundled weights/", "hub user/repo@sha", a path
    revision: str | None = None
    encoder_file: Path | None = None  # the folder's encoder.weights.h5, checked; None: keras.applications' weights
    head_file: Path | None = None  # the folder's encoder_head.weights.h5, checked; None: no objects
    visual_files: tuple[Path, Path] | None = None  # visual.json and visual.weights.h5, checked; None: no flag
    encoder_ir: Path | None = None  # the folder's encoder.xml (with encoder.bin), checked; None: converted from Keras
    decoder_step: Path | None = None  # the folder's decoder.onnx, checked; None: the NumPy step
    decoder_sha256: str | None = None  # decoder.weights.h5's checksum, checked (what decoder.onnx names)

    @property
    def metrics(self) -> dict | None:
        path = self.path / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_config(folder: str | Path, config: ModelConfig, encoder_weights: str = "imagenet",
                 encoder_file: str | Path | None = None, **extra) -> Path:
    """Write config.json for a folder that already holds vocab.json and decoder.weights.h5.

    encoder_file: the encoder's weights file, for encoders keras.applications lacks: copied into the
    folder as encoder.weights.h5 and checksummed. Without it, a leftover encoder.weights.h5 of an
    earlier run in the same folder is removed (it would belong to another model), as are the optional files
    (the ImageNet head, the familiarity summary and word map): `add_files` adds them to the new model.
    """
    folder = Path(folder)
    target = folder / ENCODER_WEIGHTS_FILE
    if encoder_file is None:
        target.unlink(missing_ok=True)
    elif Path(encoder_file).resolve() != target.resolve():
        shutil.copyfile(encoder_file, target)
    for name in OPTIONAL_CHECKSUMMED_FILES[1:]:
        (folder / name).unlink(missing_ok=True)
    files = [*CHECKSUMMED_FILES, *([ENCODER_WEIGHTS_FILE] if encoder_file is not None else [])]
    content = {
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "encoder_weights": encoder_weights,
        "special_tokens": list(SPECIAL_TOKENS),
        "files": {name: sha256(folder / name) for name in files},
        **extra,
    }
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def add_files(folder: str | Path, files: dict[str, str | Path]) -> Path:
    """Copy optional files into a weights folder ({name in the folder: source}) and list their checksums in its
    config.json, every other file and setting as it was: how the ImageNet head and the familiarity files join a
    trained folder (the bundled one included). A new version of a file that decoder.onnx is made from removes
    decoder.onnx (export it again: training/export_decoder.py). -> the config's path."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    content = json.loads(path.read_text())
    for name, source in files.items():
        if name not in OPTIONAL_CHECKSUMMED_FILES:
            raise ValueError(f"{name} is not one of a weights folder's optional files ({', '.join(OPTIONAL_CHECKSUMMED_FILES)})")
        if Path(source).resolve() != (folder / name).resolve():
            shutil.copyfile(source, folder / name)
        checksum = sha256(folder / name)
        if name in DECODER_STEP_SOURCES and checksum != content["files"].get(name):
            content["files"].pop(DECODER_STEP_FILE, None)
            (folder / DECODER_STEP_FILE).unlink(missing_ok=True)
        content["files"][name] = checksum
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def read_folder(folder: str | Path, source: str | None = None, revision: str | None = None) -> WeightsFolder:
    """Check a weights folder (files present, checksums match) and read its config."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(
            f"No trained weights in {folder} (no {CONFIG_FILE}). Train them with `python -m training.run_all`, "
            "or set CAPTIONER_REPO to a Hugging Face Hub model repo."
        )
    try:
        content = json.loads(config_path.read_text())
        config = ModelConfig.from_dict(content["model"])
        checksums = content["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{config_path} is not a valid captioner config ({exc}).") from None
    if content.get("format_version", 1) > FORMAT_VERSION:
        raise WeightsError(f"{folder} was written by a newer version of this project; please update it.")
    for name in OPTIONAL_CHECKSUMMED_FILES:
        if (folder / name).is_file() and name not in checksums:
            raise WeightsError(f"{folder / name} is not listed in {CONFIG_FILE}'s checksums, so it can't be trusted; "
                               "copy or download the weights folder again.")
    if (ENCODER_IR_FILE in checksums) != (ENCODER_IR_WEIGHTS_FILE in checksums):
        raise WeightsError(f"{folder} is incomplete: {ENCODER_IR_FILE} and {ENCODER_IR_WEIGHTS_FILE} go together.")
    if (VISUAL_SETTINGS_FILE in checksums) != (VISUAL_WEIGHTS_FILE in checksums):
        raise WeightsError(f"{folder} is incomplete: {VISUAL_SETTINGS_FILE} and {VISUAL_WEIGHTS_FILE} go together.")
    for name in [*CHECKSUMMED_FILES, *(name for name in OPTIONAL_CHECKSUMMED_FILES if name in checksums)]:
        path = folder / name
        if not path.is_file():
            raise WeightsError(f"{folder} is incomplete: {name} is missing.")
        if name not in checksums or sha256(path) != checksums[name]:
            raise WeightsError(
                f"{path} does not match the checksum in {CONFIG_FILE}: the file is damaged, incomplete or was "
                "changed after training. Download or copy the weights folder again."
            )
    listed = lambda name: folder / name if name in checksums else None  # noqa: E731
    return WeightsFolder(folder, config, content.get("encoder_weights", "imagenet"), source or str(folder), revision,
                         listed(ENCODER_WEIGHTS_FILE), listed(HEAD_FILE),
                         (folder / VISUAL_SETTINGS_FILE, folder / VISUAL_WEIGHTS_FILE) if listed(VISUAL_WEIGHTS_FILE) else None,
                         encoder_ir=listed(ENCODER_IR_FILE), decoder_step=listed(DECODER_STEP_FILE),
                         decoder_sha256=checksums[WEIGHTS_FILE])


def load_vocabulary(folder: WeightsFolder) -> Vocabulary:
    vocab = Vocabulary.load(folder.path / VOCAB_FILE)
    if len(vocab) != folder.config.vocab_size:
        raise WeightsError(f"{folder.path}: vocab.json has {len(vocab)} ids but config.json says {folder.config.vocab_size}.")
    return vocab


def read_decoder_weights(folder: WeightsFolder) -> dict[str, list[np.ndarray]]:
    """decoder.weights.h5 -> each layer's weights by layer name, read with h5py: serving needs no Keras.

    Keras' .weights.h5 keeps a layer's arrays under layers/<its own key>/vars/0, 1, ... (an LSTM's under
    .../cell/vars), with the layer's name as the `name` attribute of its vars group. Every shape is checked
    against config.json before any array is read.
    """
    import h5py

    path, expected = folder.path / WEIGHTS_FILE, folder.config.weight_shapes()
    try:
        with h5py.File(path, "r") as file:
            found = {}
            for group in file["layers"].values():
                name = group["vars"].attrs.get("name") if "vars" in group else None
                if name in expected:
                    variables = group["cell/vars"] if "cell/vars" in group else group["vars"]
                    found[name] = [variables[str(i)] for i in range(len(variables))]
            for name, shapes in expected.items():
                shapes_found = [tuple(array.shape) for array in found.get(name, [])]
                if shapes_found != shapes:
                    raise ValueError(f"layer '{name}' has weights of shapes {shapes_found or 'none'}, not {shapes}")
            return {name: [np.asarray(array[()], np.float32) for array in found[name]] for name in expected}
    except (OSError, KeyError, ValueError, TypeError) as exc:  # not HDF5, not Keras' layout, other shapes
        raise WeightsError(f"{path} does not fit the model in {CONFIG_FILE}: {exc}") from None


def download_from_hub(repo_id: str, revision: str | None = None) -> WeightsFolder:
    """Fetch a weights folder from a Hub model repo into the standard Hugging Face cache.

    Works offline (HF_HUB_OFFLINE=1, or the network down) when the cache holds the revision.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision or 'main'}"
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=FOLDER_FILES)
    except RepositoryNotFoundError:
        raise WeightsError(
            f"The Hub repo '{repo_id}' does not exist, or it is private (log in with `hf auth login` or set HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(f"The Hub repo '{repo_id}' has no revision '{revision}'.") from None
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
        reason = "offline mode (HF_HUB_OFFLINE) is on" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub can't be reached"
        raise WeightsError(f"Can't get {at}: {reason} and the local cache doesn't hold it.") from None
    except EntryNotFoundError as exc:
        raise WeightsError(f"{at} is missing a file: {exc}.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsError(f"Downloading {at} from the Hugging Face Hub failed: {exc}") from None
    commit = Path(path).name  # snapshots/<commit sha>
    return read_folder(path, source=f"Hub {repo_id}@{commit[:10]}", revision=commit)
