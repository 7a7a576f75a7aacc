"""The image encoder: a frozen ImageNet CNN with global average pooling.

An `EncoderSpec` builds the CNN up to its last feature map A (h x w x C); the
encoder's output is the global average of A over its h x w positions, the
caption model's image features. explain.py also uses A itself. backends.py runs the Keras model
with OpenVINO or TensorFlow.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from . import efficientnet_lite
from .backends import load_backend
from .image import prepare_images

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


def keras_application(constructor, input_size: tuple[int, int], **options) -> Callable[[str | Path | None], keras.Model]:
    """A keras.applications CNN without its classifier, as an EncoderSpec.build."""
    width, height = input_size
    return lambda weights: constructor(include_top=False, weights=weights, input_shape=(height, width, 3), **options)


# Adding an encoder is one entry here (plus training a decoder on its features).
ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": EncoderSpec(
        keras_application(keras.applications.ResNet50, (224, 224)), keras.applications.resnet50.preprocess_input, (224, 224), 2048
    ),
    "mobilenet_v2": EncoderSpec(
        keras_application(keras.applications.MobileNetV2, (224, 224), alpha=0.5),
        keras.applications.mobilenet_v2.preprocess_input, (224, 224), 1280,
    ),
    "inception_v3": EncoderSpec(
        keras_application(keras.applications.InceptionV3, (299, 299)), keras.applications.inception_v3.preprocess_input, (299, 299), 2048
    ),
    "xception": EncoderSpec(
        keras_application(keras.applications.Xception, (299, 299)), keras.applications.xception.preprocess_input, (299, 299), 2048
    ),
    "densenet201": EncoderSpec(
        keras_application(keras.applications.DenseNet201, (224, 224)), keras.applications.densenet.preprocess_input, (224, 224), 1920
    ),
    # EfficientNet-Lite0/1/2 (efficientnet_lite.py): keras.applications has none, so their ImageNet weights are a
    # file, converted by training/convert_encoder.py and carried by the weights folder (encoder.weights.h5).
    **{
        name: EncoderSpec(efficientnet_lite.encoder_builder(name), efficientnet_lite.preprocess_input,
                          (scaling.resolution, scaling.resolution), efficientnet_lite.FEATURE_DIM)
        for name, scaling in efficientnet_lite.VARIANTS.items()
    },
}


class ImageEncoder:
    """Images -> (n, feature_dim) float32 features. Training's feature cache and the app both use it.

    weights="imagenet" loads Keras' ImageNet weights from ~/.keras/models/ (or
    $KERAS_HOME/models/), downloading them there when missing; a path loads a
    weights file of our own (encoders keras.applications lacks); weights=None
    leaves them random (tests, and the --random-encoder recipe).
    """

    def __init__(self, name: str, weights: str | Path | None = "imagenet", backend: str | None = None):
        """backend: "openvino" or "tensorflow"; None: $CAPTIONER_BACKEND, else OpenVINO where it imports (backends.py)."""
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
        self.name, self.spec = name, ENCODERS[name]
        self.feature_map_model = _build_reproducibly(self.spec, weights)
        self.feature_map_model.trainable = False
        self.backend = load_backend(self.feature_map_model, backend)

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
        return self.backend(self.spec.preprocess_input(np.array(pixels, dtype=np.float32)), feature_maps)


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
