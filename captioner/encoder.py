"""The image encoder: a frozen ImageNet CNN from keras.applications with global average pooling."""

from __future__ import annotations

from dataclasses import dataclass
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
    build: Callable[..., keras.Model]  # keras.applications constructor
    preprocess_input: Callable[[np.ndarray], np.ndarray]
    input_size: tuple[int, int]  # (width, height)
    feature_dim: int
    options: tuple[tuple[str, object], ...] = ()  # extra constructor arguments


# Adding an encoder is one entry here (plus training a decoder on its features).
ENCODERS: dict[str, EncoderSpec] = {
    "resnet50": EncoderSpec(keras.applications.ResNet50, keras.applications.resnet50.preprocess_input, (224, 224), 2048),
    "mobilenet_v2": EncoderSpec(
        keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input, (224, 224), 1280, (("alpha", 0.5),)
    ),
    "inception_v3": EncoderSpec(keras.applications.InceptionV3, keras.applications.inception_v3.preprocess_input, (299, 299), 2048),
    "xception": EncoderSpec(keras.applications.Xception, keras.applications.xception.preprocess_input, (299, 299), 2048),
    "densenet201": EncoderSpec(keras.applications.DenseNet201, keras.applications.densenet.preprocess_input, (224, 224), 1920),
}


class ImageEncoder:
    """Images -> (n, feature_dim) float32 features. Training's feature cache and the app both use it.

    weights="imagenet" loads Keras' ImageNet weights from ~/.keras/models/ (or
    $KERAS_HOME/models/), downloading them there when missing; weights=None
    leaves them random (tests, and the --random-encoder recipe).
    """

    def __init__(self, name: str, weights: str | None = "imagenet"):
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
        self.name, self.spec = name, ENCODERS[name]
        width, height = self.spec.input_size
        self.model = self.spec.build(
            include_top=False, weights=weights, pooling="avg", input_shape=(height, width, 3), **dict(self.spec.options)
        )
        self.model.trainable = False
        # One traced graph for every batch size: model.predict() costs ~20 ms of overhead per call,
        # as much as MobileNetV2's whole forward pass on one image.
        self._forward = tf.function(
            lambda pixels: self.model(pixels, training=False),
            input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32)],
        )

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def __call__(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or arrays; see image.load_image) -> features."""
        images = list(images)
        batches = [
            self.encode_pixels(prepare_images(images[i : i + BATCH_SIZE], self.spec.input_size))
            for i in range(0, len(images), BATCH_SIZE)
        ]
        return np.concatenate(batches) if batches else np.zeros((0, self.feature_dim), np.float32)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) resized RGB pixels 0..255 -> features."""
        pixels = self.spec.preprocess_input(np.array(pixels, dtype=np.float32))
        return self._forward(tf.constant(pixels)).numpy()
