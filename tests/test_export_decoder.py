"""The decoder's step in int8 (training/export_decoder.py, model.Int8StepModel): the same network, fewer bytes.

The NumPy step (StepModel) stays the reference: the ONNX graph in float32 is that step, and the int8 graph is close
to it; a folder's decoder.onnx is used only with the decoder and the words it was made from.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest

from captioner import Captioner, DecodingOptions
from captioner.model import DECODER_VARIABLE, Int8StepModel, StepModel, decoder_precision
from captioner.weights import BUNDLED_WEIGHTS, DECODER_STEP_FILE, VISUAL_WEIGHTS_FILE, add_files, read_folder
from training.export_decoder import ExportDecoderConfig, export, step_graph


def run_graph(graph, image, tokens, state):
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image, "token": tokens, "h": state[0], "c": state[1]})


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def some_steps(model: StepModel, rows: int, seed: int = 0):
    """An image branch, tokens and a state that a few steps of decoding reached."""
    rng = np.random.default_rng(seed)
    image = model.project_image(rng.random((1, model.image_kernel.shape[0]), dtype=np.float32) * 3)
    state = model.initial_state(rows)
    for _ in range(3):
        _, state = model.step(image, rng.integers(4, model.output_kernel.shape[1], rows), state)
    return image, rng.integers(4, model.output_kernel.shape[1], rows), state


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory, tiny_weights):
    folder = shutil.copytree(tiny_weights, tmp_path_factory.mktemp("int8") / "weights")
    export(ExportDecoderConfig(folder, tmp_path_factory.mktemp("work")))
    return folder


def test_the_graph_in_float32_is_the_numpy_step(tiny_captioner):
    model = tiny_captioner.step_model
    graph = step_graph(model, model.embeddings)
    for rows in (1, 5):
        image, tokens, state = some_steps(model, rows)
        for image_rows in (image, np.repeat(image, rows, axis=0)):  # one image for every row, or one each
            logits, h, c = run_graph(graph, image_rows, tokens, state)
            expected_logits, (expected_h, expected_c) = model.step(image_rows, tokens, state)
            np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
            np.testing.assert_allclose(h, expected_h, atol=1e-6)
            np.testing.assert_allclose(c, expected_c, atol=1e-6)


def test_an_exported_folder_decodes_with_the_int8_step(exported_tiny):
    folder = read_folder(exported_tiny)  # decoder.onnx is checksummed like every file
    assert folder.decoder_step == exported_tiny / DECODER_STEP_FILE
    graph = onnx.load(folder.decoder_step)
    quantized = {node.op_type for node in graph.graph.node} & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert quantized == {"MatMulInteger", "DynamicQuantizeLinear"}

    int8, float32 = Captioner.from_folder(folder), Captioner.from_folder(folder, decoder="float32")
    assert type(int8.step_model) is Int8StepModel and type(float32.step_model) is StepModel
    image, tokens, state = some_steps(float32.step_model, 4)
    logits, (h, _) = int8.step_model.step(image, tokens, state)
    expected, (expected_h, _) = float32.step_model.step(image, tokens, state)
    assert logits.shape == expected.shape and h.shape == expected_h.shape
    # int8 weights and inputs: close, not equal (the bundled model's captions: test_bundled_weights.py). The words
    # that matter, those float32 gives at least 1%, keep their log-probabilities within 0.3 (0.12 here: this random
    # network's logits span about 45, and int8's error grows with the span), and the best stays best.
    ours, reference = log_softmax(logits), log_softmax(expected)
    likely = reference > np.log(0.01)
    assert np.abs(ours - reference)[likely].max() < 0.3 and 0 < np.abs(ours - reference).max()
    np.testing.assert_array_equal(ours.argmax(axis=1), reference.argmax(axis=1))
    for options in (DecodingOptions("greedy"), DecodingOptions()):
        words = int8.caption_features(np.ones((2, folder.config.feature_dim), np.float32), options)[0].text.split()
        assert words and all(word in int8.vocab.stoi for word in words)


def test_captioner_decoder_chooses_numpys_step(exported_tiny, monkeypatch):
    monkeypatch.setenv(DECODER_VARIABLE, "float32")
    assert type(Captioner.from_folder(read_folder(exported_tiny)).step_model) is StepModel
    monkeypatch.setenv(DECODER_VARIABLE, "int4")
    with pytest.raises(ValueError, match="CAPTIONER_DECODER must be 'int8' or 'float32'"):
        decoder_precision()


def test_a_decoder_onnx_made_from_another_decoder_is_not_used(exported_tiny, tmp_path, caplog):
    folder = shutil.copytree(exported_tiny, tmp_path / "weights")
    graph = onnx.load(folder / DECODER_STEP_FILE)
    onnx.helper.set_model_props(graph, {"decoder_sha256": "0" * 64, "new_words": ""})
    onnx.save(graph, tmp_path / DECODER_STEP_FILE)
    add_files(folder, {DECODER_STEP_FILE: tmp_path / DECODER_STEP_FILE})
    with caplog.at_level(logging.WARNING, logger="captioner.inference"):
        captioner = Captioner.from_folder(read_folder(folder))
    assert type(captioner.step_model) is StepModel
    assert "made from another decoder" in caplog.text


def test_new_visual_words_remove_the_folders_decoder_onnx(exported_tiny, tmp_path):
    """decoder.onnx holds the words the visual step added: new ones make it stale, so it goes with them."""
    folder = shutil.copytree(exported_tiny, tmp_path / "weights")
    (tmp_path / VISUAL_WEIGHTS_FILE).write_bytes(b"other words")
    add_files(folder, {VISUAL_WEIGHTS_FILE: tmp_path / VISUAL_WEIGHTS_FILE})
    assert not (folder / DECODER_STEP_FILE).exists()
    assert DECODER_STEP_FILE not in json.loads((folder / "config.json").read_text())["files"]


def test_a_network_grown_by_other_words_than_the_graphs_steps_in_numpy(exported_tiny):
    model = Captioner.from_folder(read_folder(exported_tiny)).step_model
    rng = np.random.default_rng(0)
    embeddings, kernel = rng.random((2, model.embeddings.shape[1]), dtype=np.float32), rng.random((model.units, 2), dtype=np.float32)
    grown = model.with_new_words(embeddings, kernel, np.zeros(2, np.float32))  # the tiny folder's graph has no new words
    assert type(grown) is StepModel and grown.output_kernel.shape[1] == model.output_kernel.shape[1] + 2


def test_the_bundled_folder_names_its_new_words_in_its_graph():
    """The bundled graph holds the vocabulary grown by its visual words: naming objects steps in int8 too."""
    captioner = Captioner.from_pretrained(BUNDLED_WEIGHTS)
    assert type(captioner.step_model) is Int8StepModel and type(captioner.naming.model) is Int8StepModel
    assert captioner.description["decoder"] == "int8"  # the page's model line says so
    graph_words = captioner.step_model.session.get_outputs()[0].shape[1]
    assert graph_words == len(captioner.naming.vocab) > len(captioner.vocab)


@pytest.mark.parametrize("damage", ["not an ONNX file", "a graph for another network", "no onnxruntime"])
def test_a_decoder_onnx_that_cant_serve_leaves_numpys_step(exported_tiny, tmp_path, caplog, monkeypatch, tiny_captioner, damage):
    """A folder's file (a Hub repo's) is not trusted: whatever it holds, the captioner loads, says why in the log,
    and decodes in NumPy."""
    folder = shutil.copytree(exported_tiny, tmp_path / "weights")
    if damage == "not an ONNX file":
        (tmp_path / DECODER_STEP_FILE).write_bytes(b"\x08\x07garbage" * 100)
    elif damage == "a graph for another network":  # another width: its logits would not fit the vocabulary
        other = tiny_captioner.step_model
        graph = step_graph(other.with_new_words(np.zeros((0, other.embeddings.shape[1]), np.float32), np.zeros((other.units, 0), np.float32),
                                                np.zeros(0, np.float32)), other.embeddings)
        graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
        onnx.save(graph, tmp_path / DECODER_STEP_FILE)
    else:
        shutil.copyfile(folder / DECODER_STEP_FILE, tmp_path / DECODER_STEP_FILE)
        monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    add_files(folder, {DECODER_STEP_FILE: tmp_path / DECODER_STEP_FILE})
    with caplog.at_level(logging.WARNING, logger="captioner.inference"):
        captioner = Captioner.from_folder(read_folder(folder))
    assert type(captioner.step_model) is StepModel and "decoding in float32 NumPy" in caplog.text
    assert captioner.caption_features(np.ones((1, captioner.config.feature_dim), np.float32))[0].text


def test_an_images_int8_caption_does_not_depend_on_the_images_decoded_with_it(example_images):
    """The int8 step quantizes a call's inputs with one scale: it calls once per image, so a batch's captions are
    each image's own (the batch command, a resumed job and Ray give the app's captions)."""
    captioner = Captioner.from_pretrained(BUNDLED_WEIGHTS)
    features = captioner.encode(example_images)
    for options in (DecodingOptions(), DecodingOptions("greedy", name_objects=False)):
        together = captioner.caption_features(features, options)
        alone = [captioner.caption_features(features[i : i + 1], options)[0] for i in range(len(features))]
        for ours, own in zip(together, alone):  # (log-probabilities summed in another order: to 1e-5)
            assert [text for text, _ in ours.candidates] == [text for text, _ in own.candidates]
            np.testing.assert_allclose([lp for _, lp in ours.candidates], [lp for _, lp in own.candidates], rtol=1e-5)
