"""EfficientNet-Lite0/1/2 in plain Keras 3 functional code (Keras has no EfficientNet-Lite application).

EfficientNet-Lite is Google's EfficientNet made friendly to mobile accelerators and quantisation:
no squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels)
that stay fixed while the model is scaled, as do the repeats of the first and last stages. It follows
the TensorFlow reference (tensorflow/tpu, models/official/efficientnet/lite): TensorFlow "same" padding
(which Keras' padding="same" is: stride-2 convolutions pad one pixel more at the bottom and right),
batch-norm epsilon 1e-3, inputs scaled as (x - 127) / 128.

Layer names say which part of the network a layer is, and match the PyTorch state dict's names
one to one (training/convert_encoder.py maps them):

    stem_conv, stem_bn                          _conv_stem, _bn0
    block{i}_expand_conv, block{i}_expand_bn    _blocks.{i}._expand_conv, _blocks.{i}._bn0   (not in block 0)
    block{i}_depthwise_conv, block{i}_depthwise_bn   _blocks.{i}._depthwise_conv, _blocks.{i}._bn1
    block{i}_project_conv, block{i}_project_bn  _blocks.{i}._project_conv, _blocks.{i}._bn2
    head_conv, head_bn                          _conv_head, _bn1
    classifier                                  _fc   (only with include_top, for the ImageNet check)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .lazy import keras, layers  # imported on first use: serving runs OpenVINO's cached model


@dataclass(frozen=True)
class Scaling:
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # the input size the ImageNet weights were trained at


VARIANTS: dict[str, Scaling] = {
    "efficientnet_lite0": Scaling(1.0, 1.0, 224),
    "efficientnet_lite1": Scaling(1.0, 1.1, 240),
    "efficientnet_lite2": Scaling(1.1, 1.2, 260),
}


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int  # of the stage's first block; the others have stride 1
    expand_ratio: int
    filters_in: int
    filters_out: int


# EfficientNet-B0's seven stages of inverted-residual (MBConv) blocks, before scaling.
STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32  # fixed in the Lite models, whatever the width
HEAD_FILTERS = 1280  # fixed too: the pooled feature vector has 1280 values for every variant
CHANNEL_DIVISOR = 8  # scaled channel counts are rounded to multiples of 8
BN_EPSILON = 1e-3  # TensorFlow's value; PyTorch's default (1e-5) would shift every activation
NUM_CLASSES = 1000  # ImageNet-1k, no background class
FEATURE_DIM = HEAD_FILTERS
INPUT_MEAN, INPUT_SCALE = 127.0, 128.0


@dataclass(frozen=True)
class Block:
    index: int
    kernel: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by `width`, to a multiple of 8 and never more than 10% below the exact product (TF's rule)."""
    scaled = filters * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    return int(rounded + CHANNEL_DIVISOR if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def blocks(name: str) -> list[Block]:
    """Every MBConv block of a variant, in order."""
    scaling = VARIANTS[name]
    result = []
    for s, stage in enumerate(STAGES):
        fixed = s in (0, len(STAGES) - 1)  # the Lite models don't deepen the first and last stage
        repeats = stage.repeats if fixed else round_repeats(stage.repeats, scaling.depth)
        filters_in, filters_out = round_filters(stage.filters_in, scaling.width), round_filters(stage.filters_out, scaling.width)
        for r in range(repeats):
            result.append(Block(len(result), stage.kernel, stage.stride if r == 0 else 1, stage.expand_ratio,
                                filters_in if r == 0 else filters_out, filters_out))
    return result


def preprocess_input(pixels: np.ndarray) -> np.ndarray:
    """RGB pixels 0..255 -> the network's input, (x - 127) / 128."""
    return (np.asarray(pixels, dtype=np.float32) - INPUT_MEAN) / INPUT_SCALE


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool, dtype):
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv", dtype=dtype)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn", dtype=dtype)(x)
    return layers.ReLU(6.0, name=f"{name}_relu", dtype=dtype)(x) if relu else x


def _mbconv(x, block: Block, dtype):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection, identity shortcut when shapes allow."""
    name, inputs = f"block{block.index}", x
    if block.expand_ratio != 1:
        x = _conv_bn(x, block.filters_in * block.expand_ratio, 1, 1, f"{name}_expand", relu=True, dtype=dtype)
    x = layers.DepthwiseConv2D(block.kernel, block.stride, padding="same", use_bias=False,
                               name=f"{name}_depthwise_conv", dtype=dtype)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_depthwise_bn", dtype=dtype)(x)
    x = layers.ReLU(6.0, name=f"{name}_depthwise_relu", dtype=dtype)(x)
    x = _conv_bn(x, block.filters_out, 1, 1, f"{name}_project", relu=False, dtype=dtype)
    # (Training adds drop-connect here; at inference it is the identity.)
    return layers.Add(name=f"{name}_add", dtype=dtype)([inputs, x]) if block.residual else x


def build_efficientnet_lite(name: str, include_top: bool = False, input_shape: tuple[int, int, int] | None = None,
                            dtype: str = "float32") -> keras.Model:
    """Preprocessed pixels (h, w, 3) -> the last feature map (h/32, w/32, 1280), no pooling.

    include_top adds global average pooling and the 1000-way ImageNet classifier (softmax), used to
    check converted weights. input_shape defaults to the variant's training resolution. dtype
    "float16" builds a copy whose variables are half precision, for saving weights compactly.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{name}'; known: {', '.join(VARIANTS)}")
    resolution = VARIANTS[name].resolution
    inputs = keras.Input(input_shape or (resolution, resolution, 3), name="pixels")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "stem", relu=True, dtype=dtype)
    for block in blocks(name):
        x = _mbconv(x, block, dtype)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "head", relu=True, dtype=dtype)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool", dtype=dtype)(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="classifier", dtype=dtype)(x)
    return keras.Model(inputs, x, name=name)


def count_stored_arrays(path) -> int:
    """The number of variable arrays in a Keras .weights.h5 file."""
    import h5py

    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: arrays.append(name) if isinstance(item, h5py.Dataset) and "/vars/" in f"/{name}" else None)
    return len(arrays)


def load_weights(model: keras.Model, path) -> keras.Model:
    """Load a .weights.h5 file written for exactly this architecture, or raise ValueError.

    Keras matches a file's arrays to layers by position, raises when shapes differ and ignores arrays
    the model has no layer for: counting the arrays makes "every variable loaded, nothing left over" certain.
    Arrays stored as float16 are loaded into the float32 variables exactly (every float16 is a float32).
    """
    stored = count_stored_arrays(path)
    if stored != len(model.weights):
        raise ValueError(f"{path} holds {stored} arrays, {model.name} has {len(model.weights)} variables")
    model.load_weights(path)
    return model


def encoder_builder(name: str):
    """The EncoderSpec.build of a variant (encoder.py): weights None (random) or a converted weights file's path."""

    def build(weights) -> keras.Model:
        model = build_efficientnet_lite(name)
        if weights is None:
            return model
        if isinstance(weights, str) and weights == "imagenet":
            raise ValueError(
                f"{name}'s ImageNet weights don't come from keras.applications: they travel in the weights folder as "
                f"encoder.weights.h5, made by `python -m training.convert_encoder --encoder {name}`."
            )
        return load_weights(model, weights)

    return build
