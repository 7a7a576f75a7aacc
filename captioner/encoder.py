"""The image encoder: a frozen ImageNet CNN with global average pooling.

An `EncoderSpec` builds the CNN up to its last feature map A (h x w x C); the
encoder's output is the global average of A over its h x w positions, the
caption model's image features. explain.py also uses A itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

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
}


class ImageEncoder:
    """Images -> (n, feature_dim) float32 features. Training's feature cache and the app both use it.

    weights="imagenet" loads Keras' ImageNet weights from ~/.keras/models/ (or
    $KERAS_HOME/models/), downloading them there when missing; a path loads a
    weights file of our own (encoders keras.applications lacks); weights=None
    leaves them random (tests, and the --random-encoder recipe).
    """

    def __init__(self, name: str, weights: str | Path | None = "imagenet"):
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
        self.name, self.spec = name, ENCODERS[name]
        width, height = self.spec.input_size
        self.feature_map_model = self.spec.build(weights)
        self.feature_map_model.trainable = False
        # One traced graph for every batch size: model.predict() costs ~20 ms of overhead per call,
        # as much as MobileNetV2's whole forward pass on one image.
        signature = [tf.TensorSpec((None, height, width, 3), tf.float32)]
        self._pooled = tf.function(lambda pixels: tf.reduce_mean(self._maps(pixels), axis=(1, 2)), input_signature=signature)
        self._pooled_and_maps = tf.function(
            lambda pixels: (lambda maps: (tf.reduce_mean(maps, axis=(1, 2)), maps))(self._maps(pixels)), input_signature=signature
        )

    def _maps(self, pixels):
        return self.feature_map_model(pixels, training=False)

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
        pixels = tf.constant(self.spec.preprocess_input(np.array(pixels, dtype=np.float32)))
        if feature_maps:
            pooled, maps = self._pooled_and_maps(pixels)
            return pooled.numpy(), maps.numpy()
        return self._pooled(pixels).numpy()
