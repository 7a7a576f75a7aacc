"""The serving decoder step with int8 weights, an ONNX model in the weights folder (run_all's step after visual).

    python -m training.export_decoder --weights weights [--work-dir artifacts] [--evaluate]

Decoding runs the network once per word, and on this CPU a step costs what its weights cost to read: the recurrent,
hidden and output products stream 2.9 MB of float32 a step, more than a core's L2 cache. decoder.onnx is the same
step (token lookup, LSTM cell, both dense layers: model.StepModel.step) as an ONNX graph whose three products are
quantized by ONNX Runtime's dynamic quantization (int8 weights, per tensor; each call quantizes its inputs), which
model.Int8StepModel runs in one call. The token lookup table and everything around the step stay float32. The graph
holds the vocabulary grown by the folder's visual words, so run it after training/visual.py; it names the decoder's
checksum and the new words it holds, and serving ignores it (NumPy's step) for any other decoder or words.

`--evaluate` scores the app's decoding (beam 5, and greedy) on the dev and test features with the int8 step and
NumPy's float32 step (the reference), and writes the comparison to <work-dir>/decoder_export.json.

Needs the `onnx` package (training/requirements.txt); serving needs only onnxruntime.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner import Captioner, DecodingOptions
from captioner.model import StepModel, new_words_digest
from captioner.weights import BUNDLED_WEIGHTS, DECODER_STEP_FILE, add_files, read_folder
from training.config import option, parse_config
from training.prepare import DEFAULT_WORK_DIR

OPSET = 17
# The embedding's product stays float32: 50 x 1,024 weights, read once a step, and the one product whose inputs
# (GloVe's vectors) no training shaped for int8.
INPUT_PRODUCT = "input_product"


@dataclass
class ExportDecoderConfig:
    weights: Path = option(BUNDLED_WEIGHTS, "the weights folder whose decoder is exported (decoder.onnx is added to it)")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (the dev and test features, for --evaluate)")
    per_channel: bool = option(True, "quantize each weight column with its own scale (else one per matrix)")
    evaluate: bool = option(False, "also score the app's decoding on dev and test with the int8 and float32 steps")


def step_graph(model: StepModel, embeddings: np.ndarray):
    """The step as an ONNX model: image (m, units) with m 1 or n, token (n,), h and c (n, units) -> logits (n, words),
    h_out, c_out. embeddings: (words, embedding_dim) every word's input vector (GloVe's; the new words' after the
    vocabulary's). The LSTM's gates in Keras' order (input, forget, cell, output), as in StepModel.token_gates,
    which the graph computes from the embedding (StepModel's table of them would be 7 MB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    units, words = model.units, model.output_kernel.shape[1]
    weights = {"embeddings": embeddings, "input_kernel": model.input_kernel, "lstm_bias": model.lstm_bias,
               "recurrent_kernel": model.recurrent_kernel, "decoder_kernel": model.decoder_kernel,
               "decoder_bias": model.decoder_bias, "output_kernel": model.output_kernel, "output_bias": model.output_bias}
    initializers = [numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name) for name, array in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([units] * 4, np.int64), "gate_sizes"))
    node = helper.make_node
    nodes = [
        node("Gather", ["embeddings", "token"], ["embedded"], axis=0),
        node("MatMul", ["embedded", "input_kernel"], ["input_product"], name=INPUT_PRODUCT),
        node("MatMul", ["h", "recurrent_kernel"], ["state_gates"]),
        node("Add", ["input_product", "state_gates"], ["unbiased_gates"]), node("Add", ["unbiased_gates", "lstm_bias"], ["gates"]),
        node("Split", ["gates", "gate_sizes"], ["input_pre", "forget_pre", "cell_pre", "output_pre"], axis=1),
        node("Sigmoid", ["input_pre"], ["input_gate"]), node("Sigmoid", ["forget_pre"], ["forget_gate"]),
        node("Tanh", ["cell_pre"], ["cell_input"]), node("Sigmoid", ["output_pre"], ["output_gate"]),
        node("Mul", ["forget_gate", "c"], ["kept"]), node("Mul", ["input_gate", "cell_input"], ["added"]),
        node("Add", ["kept", "added"], ["c_out"]), node("Tanh", ["c_out"], ["cell_output"]),
        node("Mul", ["output_gate", "cell_output"], ["h_out"]),
        node("Add", ["image", "h_out"], ["merged"]),
        node("MatMul", ["merged", "decoder_kernel"], ["hidden_pre"]), node("Add", ["hidden_pre", "decoder_bias"], ["hidden_biased"]),
        node("Relu", ["hidden_biased"], ["hidden"]),
        node("MatMul", ["hidden", "output_kernel"], ["logits_pre"]), node("Add", ["logits_pre", "output_bias"], ["logits"]),
    ]
    tensor = lambda name, shape, kind=TensorProto.FLOAT: helper.make_tensor_value_info(name, kind, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes, "caption_decoder_step",
        [tensor("image", ["m", units]), tensor("token", ["n"], TensorProto.INT64), tensor("h", ["n", units]), tensor("c", ["n", units])],
        [tensor("logits", ["n", words]), tensor("h_out", ["n", units]), tensor("c_out", ["n", units])], initializers)
    graph_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    graph_model.ir_version = 9  # what onnxruntime 1.20 and later read
    onnx.checker.check_model(graph_model)
    return graph_model


def export(config: ExportDecoderConfig) -> dict:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = read_folder(config.weights)
    captioner = Captioner.from_folder(folder, decoder="float32")
    naming = captioner.naming  # the network grown by the folder's visual words, if it has any
    model = naming.model if naming else captioner.step_model
    words = naming.visual_words if naming else None
    embeddings = np.concatenate([captioner.step_model.embeddings, words.new_embeddings]) if words else captioner.step_model.embeddings
    new_words = new_words_digest(words.new_embeddings, words.new_output_kernel, words.new_output_bias) if words else ""
    started = time.time()
    with tempfile.TemporaryDirectory() as staging:
        float32_path, int8_path = Path(staging) / "float32.onnx", Path(staging) / DECODER_STEP_FILE
        onnx.save(step_graph(model, embeddings), float32_path)
        # Only the products (the embedding stays a float32 table: one row a step). The quantizer's advice to run
        # its shape inference first is for graphs of unknown shapes: this one declares its own (root logger).
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(float32_path, int8_path, op_types_to_quantize=["MatMul"], nodes_to_exclude=[INPUT_PRODUCT],
                             per_channel=config.per_channel, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(int8_path)
        onnx.helper.set_model_props(quantized, {"decoder_sha256": folder.decoder_sha256, "new_words": new_words})
        onnx.save(quantized, int8_path)
        add_files(folder.path, {DECODER_STEP_FILE: int8_path})
    report = {"settings": {k: str(v) for k, v in asdict(config).items()}, "export_seconds": round(time.time() - started, 1),
              "bytes": (folder.path / DECODER_STEP_FILE).stat().st_size, "words": int(model.output_kernel.shape[1])}
    print(f"{folder.path / DECODER_STEP_FILE} written: {report['bytes'] / 2**20:.2f} MiB, {report['words']} words")
    if config.evaluate:
        report["scores"] = score_both(config.weights, config.work_dir)
    out = Path(config.work_dir) / "decoder_export.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def score_both(weights: Path, work_dir: Path) -> dict:
    """The app's decoding (beam 5, and greedy) on the dev and test features, int8 step against float32."""
    from training.evaluate import coco_scores
    from training.features import load_features

    folder = read_folder(weights)
    captioners = {precision: Captioner.from_folder(folder, decoder=precision) for precision in ("int8", "float32")}
    dataset = json.loads((Path(work_dir) / "dataset.json").read_text())
    scores = {}
    for split in ("dev", "test"):
        features, names = load_features(Path(work_dir), folder.config.encoder, split)
        references = {name: dataset["splits"][split][name] for name in names}
        for method in ("beam", "greedy"):
            texts = {}
            for precision, captioner in captioners.items():
                texts[precision] = {n: c.text for n, c in zip(names, captioner.caption_features(features, DecodingOptions(method)))}
                found = coco_scores(references, texts[precision])
                scores[f"{split}_{method}_{precision}"] = {k: round(float(found[k]), 4) for k in ("CIDEr", "BLEU-4")}
            scores[f"{split}_{method}_same_captions"] = sum(texts["int8"][n] == texts["float32"][n] for n in names)
            print(split, method, {k: v for k, v in scores.items() if k.startswith(f"{split}_{method}")}, flush=True)
    return scores


def main(argv=None):
    export(parse_config(ExportDecoderConfig, argv, __doc__))


if __name__ == "__main__":
    main()
