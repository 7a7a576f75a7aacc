"""Serving needs neither TensorFlow nor Keras (issue 19): the bundled folder carries its encoder as an OpenVINO model
(encoder.xml + encoder.bin), so a fresh process with an empty cache captions a photo with both unimportable, and a
folder without that model says what to install."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from captioner.weights import ENCODER_IR_WEIGHTS_FILE, WeightsError, read_folder
from tests.conftest import EXAMPLES, ROOT
from training.export_encoder import without_openvino_model

# Imported at start-up by every Python process that has this folder on its path: TensorFlow and Keras can't be imported.
BLOCKER = 'import sys\nsys.modules["tensorflow"] = sys.modules["keras"] = None\n'


def run_without_tensorflow(tmp_path, *args):
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]),
           "CAPTIONER_CACHE": str(tmp_path / "empty-cache"), "CAPTIONER_REPO": ""}
    env.pop("CAPTIONER_BACKEND", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_the_blocker_blocks(tmp_path):
    result = run_without_tensorflow(tmp_path, "-c", "import keras")
    assert result.returncode != 0 and "keras" in result.stderr


def test_the_bundled_folder_serves_with_no_tensorflow_and_an_empty_cache(tmp_path):
    assert read_folder(ROOT / "weights").encoder_ir is not None
    result = run_without_tensorflow(tmp_path, "-m", "captioner", str(EXAMPLES / "dog.jpg"), "--json")
    assert result.returncode == 0, result.stderr
    caption = json.loads(result.stdout)
    assert "dog" in caption["caption"]
    assert "cuda" not in result.stderr.lower() and "Traceback" not in result.stderr


def test_a_folder_whose_encoder_needs_keras_says_what_to_install(tmp_path):
    folder = without_openvino_model(ROOT / "weights", tmp_path / "weights")
    result = run_without_tensorflow(tmp_path, "-m", "captioner", str(EXAMPLES / "dog.jpg"), "--weights", str(folder))
    assert result.returncode != 0
    assert "pip install -r training/requirements.txt" in result.stderr, result.stderr


def test_the_openvino_model_files_go_together(tmp_path):
    folder = shutil.copytree(ROOT / "weights", tmp_path / "weights")
    config = json.loads((folder / "config.json").read_text())
    del config["files"][ENCODER_IR_WEIGHTS_FILE]
    (folder / ENCODER_IR_WEIGHTS_FILE).unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="go together"):
        read_folder(folder)


CAN_BE_BUILT = """
from captioner.backends import default_cache_dir
from captioner.encoder import can_be_built, encoder_cache_key
print(can_be_built("resnet50"))
folder = default_cache_dir() / "openvino" / encoder_cache_key("resnet50", "imagenet")  # as an earlier run caches it
folder.mkdir(parents=True)
(folder / "encoder.xml").write_text("<net/>")
print(can_be_built("resnet50"), can_be_built("resnet50", None))
"""


def test_without_tensorflow_a_keras_encoder_can_be_built_only_from_the_cache(tmp_path):
    """What the page's menu asks before offering ResNet50 (webapp/models.py): with TensorFlow, always; without it, only
    the encoder whose OpenVINO model an earlier run cached."""
    from captioner.encoder import can_be_built

    assert can_be_built("resnet50")  # TensorFlow is installed for the tests
    result = run_without_tensorflow(tmp_path, "-c", CAN_BE_BUILT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "False"]  # random weights are another model
