"""Loading weights folders: integrity checks and clear refusals."""

import json

import numpy as np
import pytest

from captioner import Captioner, WeightsError, build_caption_model
from captioner.weights import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, read_decoder_weights, read_folder, sha256
from tests.conftest import ROOT


def test_a_folder_loads_and_captions(tiny_weights, example_images):
    captioner = Captioner.from_pretrained(tiny_weights)
    caption = captioner.caption(example_images[0])
    assert caption.text and caption.candidates[0][0] == caption.text
    assert captioner.description["source"] == str(tiny_weights)


def test_weights_round_trip_exactly(tiny_weights, tiny_captioner):
    reloaded = Captioner.from_pretrained(tiny_weights)
    for a, b in zip(reloaded.model.get_weights(), tiny_captioner.model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_the_decoder_weights_read_without_keras_are_those_keras_loads(tiny_weights, which):
    folder = read_folder(tiny_weights if which == "tiny" else ROOT / "weights")
    model = build_caption_model(folder.config)
    model.load_weights(folder.path / WEIGHTS_FILE)
    read = read_decoder_weights(folder)
    assert set(read) == {layer.name for layer in model.layers if layer.get_weights()}
    for name, arrays in read.items():
        expected = model.get_layer(name).get_weights()
        assert [a.shape for a in arrays] == [e.shape for e in expected] == folder.config.weight_shapes()[name]
        for array, value in zip(arrays, expected):
            np.testing.assert_array_equal(array, value)


def rewrite_checksums(folder):
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["files"] = {name: sha256(folder / name) for name in config["files"]}
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_weights_of_another_model_are_refused_by_layer(tiny_weights_copy):
    config = json.loads((tiny_weights_copy / CONFIG_FILE).read_text())
    config["model"]["units"] = 16  # the file's LSTM has 32
    (tiny_weights_copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"does not fit the model in config.json: layer 'image_dense' has weights of shapes"):
        Captioner.from_pretrained(tiny_weights_copy)


def test_a_decoder_file_that_is_not_hdf5_is_refused(tiny_weights_copy):
    (tiny_weights_copy / WEIGHTS_FILE).write_bytes(b"not an HDF5 file" * 100)
    rewrite_checksums(tiny_weights_copy)  # as if it had been written so: the checksum can't catch it
    with pytest.raises(WeightsError, match="does not fit the model in config.json"):
        Captioner.from_pretrained(tiny_weights_copy)


def test_config_records_checksums_of_every_needed_file(tiny_weights):
    config = json.loads((tiny_weights / CONFIG_FILE).read_text())
    assert set(config["files"]) == {VOCAB_FILE, WEIGHTS_FILE}
    assert all(len(digest) == 64 for digest in config["files"].values())


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "append"])
def test_a_tampered_weights_file_is_refused(tiny_weights_copy, damage):
    path = tiny_weights_copy / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data += b"extra"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match the checksum"):
        Captioner.from_pretrained(tiny_weights_copy)


def test_a_tampered_vocabulary_is_refused(tiny_weights_copy):
    path = tiny_weights_copy / VOCAB_FILE
    path.write_text(path.read_text().replace('"dog"', '"god"'))
    with pytest.raises(WeightsError, match="checksum"):
        read_folder(tiny_weights_copy)


def test_missing_files_and_folders_are_explained(tiny_weights_copy, tmp_path):
    with pytest.raises(WeightsError, match="No trained weights"):
        Captioner.from_pretrained(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    (tiny_weights_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match="incomplete"):
        Captioner.from_pretrained(tiny_weights_copy)


def test_a_broken_config_is_explained(tiny_weights_copy):
    (tiny_weights_copy / CONFIG_FILE).write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid captioner config"):
        Captioner.from_pretrained(tiny_weights_copy)


def test_a_source_that_is_neither_folder_nor_repo_id_is_explained():
    with pytest.raises(WeightsError, match="neither a weights folder nor a Hub repo id"):
        Captioner.from_pretrained("./no/such/folder")
