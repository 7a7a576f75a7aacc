"""The encoder backends: OpenVINO compiled from the one Keras encoder gives TensorFlow's features (to 1e-4)
and captions, for any Keras model, and its compiled model is cached on disk between processes."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from captioner import backends
from captioner.backends import OpenVINOBackend, TensorFlowBackend, backend_name, model_fingerprint
from captioner.encoder import ENCODERS, ImageEncoder, encoder_cache_key
from tests.conftest import ROOT


def small_cnn(seed: int = 0) -> keras.Model:
    """Not a keras.applications model: any Keras model from pixels to a feature map will do."""
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((32, 24, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(pixels)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(16, 1, activation="swish")(x)
    return keras.Model(pixels, x)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.CACHE_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_both_backends_give_the_same_features_and_feature_maps(tiny_captioner):
    encoder = tiny_captioner.encoder  # the tiny model's MobileNetV2 (random weights)
    assert encoder.backend.name == "openvino"  # the default where OpenVINO imports
    reference = TensorFlowBackend(encoder.feature_map_model)
    pixels = encoder.spec.preprocess_input(np.random.default_rng(0).uniform(0, 255, (3, 224, 224, 3)).astype(np.float32))
    pooled, maps = encoder.backend(pixels, feature_maps=True)
    expected_pooled, expected_maps = reference(pixels, feature_maps=True)
    assert pooled.shape == (3, 1280) and maps.shape == (3, 7, 7, 1280)
    np.testing.assert_allclose(pooled, expected_pooled, atol=1e-4, rtol=0)
    np.testing.assert_allclose(maps, expected_maps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, maps.mean(axis=(1, 2)), atol=1e-5)  # the pooled vector is the map's average
    np.testing.assert_array_equal(encoder.backend(pixels), pooled)


def test_any_keras_model_compiles_matches_tensorflow_and_is_cached(cache):
    model = small_cnn()
    pixels = np.random.default_rng(1).normal(size=(5, 32, 24, 3)).astype(np.float32)
    first, reference = OpenVINOBackend(model), TensorFlowBackend(model)
    np.testing.assert_allclose(first(pixels), reference(pixels), atol=1e-4)
    np.testing.assert_allclose(first(pixels, True)[1], reference(pixels, True)[1], atol=1e-4)
    assert first(pixels[:1]).shape == (1, 16)  # any batch size
    assert not first.cache_hit and list((cache / "openvino").glob("*/encoder.xml"))

    again = OpenVINOBackend(small_cnn())  # the same model built again (as by a new process): same layers and weights
    assert again.cache_hit
    np.testing.assert_array_equal(again(pixels), first(pixels))

    for xml in (cache / "openvino").glob("*/encoder.xml"):
        xml.write_text("<broken")
    rebuilt = OpenVINOBackend(model)
    assert not rebuilt.cache_hit
    np.testing.assert_array_equal(rebuilt(pixels), first(pixels))


def test_an_unwritable_cache_compiles_without_it(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(backends.CACHE_VARIABLE, str(blocker))
    model = small_cnn()
    pixels = np.ones((1, 32, 24, 3), np.float32)
    np.testing.assert_allclose(OpenVINOBackend(model)(pixels), TensorFlowBackend(model)(pixels), atol=1e-4)


def test_fingerprint_tells_models_apart_but_not_rebuilds():
    assert model_fingerprint(small_cnn()) == model_fingerprint(small_cnn())
    assert model_fingerprint(small_cnn()) != model_fingerprint(small_cnn(seed=3))
    assert model_fingerprint(small_cnn(), "2026.4") != model_fingerprint(small_cnn(), "2026.5")


def test_the_encoders_cache_key_says_what_it_computes_without_building_it(tmp_path):
    lite = ROOT / "weights" / "encoder.weights.h5"
    encoders = [("mobilenet_v2", None), ("mobilenet_v2", "imagenet"), ("efficientnet_lite0", lite)]
    keys = [encoder_cache_key(name, weights) for name, weights in encoders]
    assert len(set(keys)) == len(keys)  # each encoder and weights its own
    copy = tmp_path / "encoder.weights.h5"
    copy.write_bytes(lite.read_bytes())
    assert encoder_cache_key("efficientnet_lite0", copy) == keys[2]  # a file counts by its content
    copy.write_bytes(lite.read_bytes()[:-1] + b"x")
    assert encoder_cache_key("efficientnet_lite0", copy) != keys[2]


@pytest.mark.parametrize("name, module", [("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2"),
                                          ("inception_v3", "inception_v3"), ("xception", "xception"), ("densenet201", "densenet")])
def test_each_keras_encoders_preprocessing_is_keras_own(name, module):
    pixels = np.random.default_rng(5).uniform(0, 255, (2, 9, 7, 3)).astype(np.float32)
    expected = getattr(keras.applications, module).preprocess_input(pixels.copy())
    np.testing.assert_array_equal(ENCODERS[name].preprocess_input(pixels), expected)


SERVE = """
import sys
from captioner import Captioner
captioner = Captioner.from_pretrained(sys.argv[1])
print(captioner.caption(sys.argv[2]).text)
print(captioner.encoder.backend.cache_hit, "keras" in sys.modules, "tensorflow" in sys.modules)
"""


def test_a_restart_serves_from_the_cache_without_keras_or_tensorflow(cache, example_images, tmp_path):
    """A folder without the encoder's OpenVINO model: the first process builds the encoder in Keras and converts it;
    the next one imports neither (a cold start of about a second instead of ten)."""
    from training.export_encoder import without_openvino_model

    folder = without_openvino_model(ROOT / "weights", tmp_path / "weights")
    run = lambda: subprocess.run([sys.executable, "-c", SERVE, str(folder), str(example_images[0])],  # noqa: E731
                                 cwd=ROOT, capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    first_caption, first_facts = run()
    assert first_facts == "False True True"  # converted, with Keras and TensorFlow
    caption, facts = run()
    assert facts == "True False False"  # from the cache, with neither
    assert caption == first_caption


def test_the_backend_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_VARIABLE, raising=False)
    assert backend_name() == "openvino"
    monkeypatch.setenv(backends.BACKEND_VARIABLE, " TensorFlow ")
    assert backend_name() == "tensorflow"
    assert ImageEncoder("mobilenet_v2", weights=None).backend.name == "tensorflow"
    monkeypatch.setenv(backends.BACKEND_VARIABLE, "cuda")
    with pytest.raises(ValueError, match="must be 'openvino' or 'tensorflow', not 'cuda'"):
        backend_name()


@pytest.fixture(scope="module")
def bundled_on_both_backends():
    from captioner import Captioner

    from captioner.weights import read_folder

    # NumPy's float32 decoder step on both: the encoders are what differs (int8 steps amplify their 1e-4).
    fast, reference = (Captioner.from_folder(read_folder(ROOT / "weights"), decoder="float32") for _ in range(2))
    reference.encoder = ImageEncoder(reference.config.encoder, reference.encoder_weights, backend="tensorflow")  # not the default
    # The Keras encoder converted at load time in float32 (folders without encoder.xml): TensorFlow's numbers.
    fast.encoder = ImageEncoder(fast.config.encoder, fast.encoder_weights, backend="openvino")
    assert fast.encoder.backend.name == "openvino" and fast.encoder.backend.ir is None
    return fast, reference


def test_the_bundled_folders_openvino_model_gives_the_references_features(bundled_on_both_backends, example_images):
    """What the app serves: the folder's own encoder.xml (int8, training/export_encoder.py), against TensorFlow's
    float32 features: the same direction (cosine 0.965-0.994 on the examples here). Its captions are not the
    reference's: int8 changes about a quarter of Flickr8k's test captions (4-7 of the 10 examples, varying with
    the CPU), at test CIDEr 0.556 against 0.559 (training/export_encoder.py --evaluate, README's Speed)."""
    from captioner import Captioner

    served = Captioner.from_pretrained(ROOT / "weights")
    assert served.encoder.backend.ir == ROOT / "weights" / "encoder.xml"
    _, reference = bundled_on_both_backends
    ours, expected = served.encode(example_images), reference.encode(example_images)
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.95, cosine
    assert all(caption.text for caption in served.caption_batch(example_images))


def test_one_images_uint8_pixels_go_through_the_folders_model_with_its_preprocessing_inside(example_images):
    """The app's case, one photo: its uint8 pixels into the folder's model fixed at batch 1, with EfficientNet-Lite's
    (x - 127) / 128 done by OpenVINO, give the features (and maps) of the float path, which batches take."""
    from captioner import Captioner

    served = Captioner.from_pretrained(ROOT / "weights")
    backend = served.encoder.backend
    assert backend.encode_one_image is not None and served.encoder.spec.pixel_normalization == (127.0, 128.0)
    pixels = served.prepare_pixels(example_images)
    assert pixels.dtype == np.uint8
    one_by_one = [served.encode_pixels(pixels[i : i + 1], feature_maps=True) for i in range(len(pixels))]
    pooled, maps = backend(served.encoder.spec.preprocess_input(pixels.astype(np.float32)), feature_maps=True)
    np.testing.assert_allclose(np.concatenate([p for p, _ in one_by_one]), pooled, atol=1e-5)  # (equal here)
    np.testing.assert_allclose(np.concatenate([m for _, m in one_by_one]), maps, atol=1e-5)
    assert served.encode_pixels(pixels).shape == (len(pixels), served.config.feature_dim)  # a batch: the float path
    read_only = pixels[:1].copy()
    read_only.flags.writeable = False  # as np.asarray gives a PIL image's pixels
    np.testing.assert_array_equal(served.encode_pixels(read_only), one_by_one[0][0])


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_bundled_weights_same_captions_on_both_backends(bundled_on_both_backends, example_images, method):
    fast, reference = bundled_on_both_backends
    np.testing.assert_allclose(fast.encode(example_images), reference.encode(example_images), atol=1e-4)
    expected_captions = reference.caption_batch(example_images, method=method)
    for ours, expected in zip(fast.caption_batch(example_images, method=method), expected_captions):
        assert [text for text, _ in ours.candidates] == [text for text, _ in expected.candidates]
        np.testing.assert_allclose([lp for _, lp in ours.candidates], [lp for _, lp in expected.candidates], atol=1e-3)
