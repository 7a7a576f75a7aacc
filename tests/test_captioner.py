"""`Captioner`'s one way into the encoder: images are prepared into uint8 pixels, and `encode_pixels` encodes
them; captioning a file, its pixels and its features gives the same caption."""

import numpy as np
import pytest
from PIL import Image

from captioner import DecodingOptions


def test_a_photo_its_pixels_and_its_features_get_the_same_caption(tiny_captioner, example_images):
    pixels = tiny_captioner.prepare_pixels(example_images[:3])
    assert pixels.shape == (3, 224, 224, 3) and pixels.dtype == np.uint8
    features = tiny_captioner.encode_pixels(pixels)
    np.testing.assert_array_equal(tiny_captioner.encode(example_images[:3]), features)
    for options in (DecodingOptions(), DecodingOptions("greedy", prefix="a dog")):
        by_file = [tiny_captioner.caption(image, options) for image in example_images[:3]]
        assert tiny_captioner.caption_batch(example_images[:3], options) == by_file
        assert tiny_captioner.caption_pixels(pixels, options) == by_file
        assert tiny_captioner.caption_features(features, options) == by_file
        assert [tiny_captioner.caption(Image.fromarray(p), options) for p in pixels] == by_file


def test_the_encoder_takes_batches_of_any_size_and_feature_maps(tiny_captioner, example_images):
    pixels = tiny_captioner.prepare_pixels(example_images[:1] * 11)  # more than one encoder batch (8)
    features, maps = tiny_captioner.encode_pixels(pixels, feature_maps=True)
    assert features.shape == (11, tiny_captioner.config.feature_dim) and maps.shape == (11, 7, 7, tiny_captioner.config.feature_dim)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), features, rtol=1e-5, atol=1e-6)  # the features pool the map
    assert tiny_captioner.encode_pixels(pixels[:0]).shape == (0, tiny_captioner.config.feature_dim)


def test_pixels_of_another_size_are_refused(tiny_captioner):
    with pytest.raises(ValueError, match=r"Expected pixels of shape \(n, 224, 224, 3\)"):
        tiny_captioner.encode_pixels(np.zeros((1, 100, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="Expected pixels"):
        tiny_captioner.caption_pixels(np.zeros((224, 224, 3), np.uint8))  # one image: (1, 224, 224, 3)
