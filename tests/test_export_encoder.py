"""training/export_encoder.py: the weights folder gets its encoder as an OpenVINO model (float16 or int8), checksummed,
and a Captioner serves it, with features close to the float32 conversion's."""

import json

import numpy as np
import pytest

from captioner import Captioner
from captioner.weights import read_folder
from training.export_encoder import ExportConfig, export, without_openvino_model


@pytest.fixture
def work_dir(tmp_path, example_images):
    """A dataset.json whose training and dev photos are the examples."""
    names = {p.name: ["a photo"] for p in example_images}
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "dataset.json").write_text(json.dumps({"dataset": {"images_folder": str(example_images[0].parent)},
                                                      "splits": {"train": names, "dev": names, "test": names}}))
    return folder


@pytest.mark.parametrize("precision", ["f16", "int8"])
def test_the_folder_serves_its_exported_encoder(tiny_weights_copy, work_dir, example_images, precision):
    float32 = Captioner.from_pretrained(tiny_weights_copy).encode(example_images)
    report = export(ExportConfig(tiny_weights_copy, work_dir, precision, calibration_images=4, check_images=4))
    folder = read_folder(tiny_weights_copy)  # checksums listed and matching
    assert folder.encoder_ir == tiny_weights_copy / "encoder.xml"
    assert json.loads((tiny_weights_copy / "config.json").read_text())["encoder_ir_precision"] == precision
    served = Captioner.from_pretrained(tiny_weights_copy)
    assert served.encoder.backend.ir == folder.encoder_ir
    ours = served.encode(example_images)
    assert ours.shape == float32.shape and np.isfinite(ours).all()
    if precision == "f16":  # (int8 of this tiny random network is no measure: the bundled one's is test_backends.py's)
        cosine = (ours * float32).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(float32, axis=1)
        assert cosine.min() > 0.999, cosine
    assert report["dev_check"]["images"] == 4
    assert served.caption(example_images[0]).text
    # Without it again, the folder is an older one's: converted from Keras.
    older = without_openvino_model(tiny_weights_copy, tiny_weights_copy.parent / "older")
    assert read_folder(older).encoder_ir is None
