"""Per-word explanations: the closed-form gradient is TensorFlow's, the words' probabilities are decoding's,
and a model trained on drawn pictures looks at the right object for each word."""

from __future__ import annotations

import json
import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw

from captioner import Captioner, DecodingOptions, ImageEncoder
from captioner.explain import grad_cam, word_log_prob_gradients
from captioner.model import ModelConfig, StepModel, build_caption_model
from captioner.vocabulary import Vocabulary
from tests.test_training import COLOURS, SHAPES, needs_imagenet_mobilenet

GREEDY = DecodingOptions("greedy")


# ---- the gradient ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_model():
    keras.utils.set_random_seed(11)
    vocab = Vocabulary([f"word{i}" for i in range(60)])
    config = ModelConfig("mobilenet_v2", len(vocab), context_length=12, feature_dim=96, units=48)
    model = build_caption_model(config, np.random.default_rng(2).normal(size=(len(vocab), 50)).astype("float32"))
    kernel, bias = model.get_layer("next_word").get_weights()
    model.get_layer("next_word").set_weights([kernel * 8.0, bias])  # sharper, like write_random_weights
    return model, vocab


@pytest.mark.parametrize("renormalised", [False, True], ids=["softmax", "decoding's allowed tokens"])
def test_closed_form_gradient_equals_tensorflow_autodiff(random_model, renormalised):
    model, vocab = random_model
    step_model = StepModel(model)
    rng = np.random.default_rng(5)
    targets = np.array([*rng.integers(4, len(vocab), 7), vocab.end_id])
    # Decoding's rule: the first word may not be <end>, no word padding, <start> or <unknown>.
    allowed = np.stack([vocab.allowed_tokens(first=t == 0) for t in range(len(targets))]) if renormalised else None
    tokens = np.concatenate([[vocab.start_id], targets[:-1]])
    inputs = tf.constant(tokens[None].astype("int32"))

    # Centred features, so that some of image_dense's ReLUs are off and the gradient has to stop there.
    for features in (rng.normal(size=96).astype("float32"), rng.random(96).astype("float32") * 3):
        log_probs, gradients = word_log_prob_gradients(step_model, features, step_model.lstm_outputs(tokens), targets, allowed)

        watched = tf.constant(features[None])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(watched)
            probs = model([watched, inputs], training=False)[0]  # (steps, vocab)
            if allowed is not None:
                probs = probs * allowed / tf.reduce_sum(probs * allowed, axis=1, keepdims=True)
            expected_log_probs = [tf.math.log(probs[t, target]) for t, target in enumerate(targets)]
        expected = np.stack([tape.gradient(lp, watched).numpy()[0] for lp in expected_log_probs])

        assert np.abs(expected).max() > 0.1  # a gradient worth comparing
        np.testing.assert_allclose(gradients, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(log_probs, [lp.numpy() for lp in expected_log_probs], rtol=0, atol=1e-5)


def test_grad_cam_weighs_each_cell_by_the_gradient_and_keeps_the_positive_part():
    feature_map = np.zeros((2, 3, 2), np.float32)
    feature_map[0, 0] = [1.0, 0.0]  # evidence for the word
    feature_map[1, 2] = [0.0, 2.0]  # evidence against it
    feature_map[1, 0] = [0.5, 0.0]
    (heatmap,) = grad_cam(feature_map, np.array([[2.0, -1.0]]))
    np.testing.assert_allclose(heatmap, [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    # A word nothing in the image speaks for gets an empty map, not a division by zero.
    np.testing.assert_array_equal(grad_cam(feature_map, np.array([[-1.0, 0.0]])), np.zeros((1, 2, 3)))


# ---- the Captioner's explain() on the tiny random model ---------------------------------------------


@pytest.mark.parametrize(
    "options",
    [GREEDY, DecodingOptions("beam", beam_width=3, length_penalty=0.0), DecodingOptions(), DecodingOptions(prefix="a dog")],
    ids=["greedy", "beam3", "recommended", "prefix"],
)
def test_explains_the_caption_decoding_gives(tiny_captioner, example_images, options):
    explanation = tiny_captioner.explain(example_images[0], options=options)
    caption = tiny_captioner.caption(example_images[0], options)
    assert explanation.caption == caption  # the same caption, candidates and scores
    assert [w.word for w in explanation.words] == caption.text.split()
    if options.prefix:
        assert caption.text.startswith("a dog ")
    # The words' probabilities are decoding's: with the end token's, they multiply to the caption's probability
    # (unless it ran out of tokens before ending).
    assert explanation.log_prob == pytest.approx(caption.candidates[0][1], abs=1e-4)
    assert np.log([w.probability for w in explanation.words]).sum() >= explanation.log_prob - 1e-6
    for word in explanation.words:
        assert 0 < word.probability <= 1
        assert word.heatmap.shape == (7, 7) and word.heatmap.min() >= 0
        assert word.heatmap.max() == pytest.approx(1.0) or word.heatmap.max() == 0


def test_explains_a_given_caption_and_draws_overlays(tiny_captioner, example_images):
    photo = Image.open(example_images[1])
    explanation = tiny_captioner.explain(photo, caption="A dog, on the grass!")
    assert explanation.text == "a dog on the grass"
    assert [c[0] for c in explanation.caption.candidates] == ["a dog on the grass"]
    assert explanation.image.size == photo.size  # under OVERLAY_MAX_SIDE: as it is
    overlay = explanation.overlay(1)
    assert overlay.size == photo.size and overlay.mode == "RGB"
    heat = explanation.heatmap(1)
    assert heat.shape == (photo.height, photo.width) and 0 <= heat.min() and heat.max() <= 1
    # Colour goes where the heat is; where there is none the photo shows as it is.
    difference = np.abs(np.asarray(overlay, float) - np.asarray(photo.convert("RGB"), float)).sum(axis=2)
    assert difference[heat > 0.8].mean() > 20
    assert difference[heat < 0.01].mean() < 2


def test_explaining_a_decode_workers_pixels_is_explaining_the_photo(tiny_captioner, example_images):
    photo = Image.open(example_images[0])
    pixels = tiny_captioner.prepare_pixels([photo])[0]  # what a decode worker sends: (224, 224, 3) uint8
    from_photo = tiny_captioner.explain(photo, options=GREEDY)
    from_pixels = tiny_captioner.explain_pixels(pixels, display=np.asarray(photo), options=GREEDY)
    assert from_pixels.caption == from_photo.caption and from_pixels.log_prob == from_photo.log_prob
    for a, b in zip(from_pixels.words, from_photo.words):
        assert a.word == b.word and a.probability == b.probability
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
    assert from_pixels.image.size == photo.size  # drawn on the photo given to show
    assert tiny_captioner.explain_pixels(pixels, caption="a dog").image.size == (224, 224)  # or on the pixels


def test_large_photos_are_explained_on_a_smaller_copy(tiny_captioner):
    big = Image.new("RGB", (3000, 1500), (200, 120, 40))
    explanation = tiny_captioner.explain(big, options=GREEDY)
    assert explanation.image.size == (768, 384)
    assert explanation.overlay(0).size == (768, 384)


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("a zebra on the moon", "no words 'zebra', 'moon'"),
        ("a <unk> dog", "no word 'unk'"),
        ("!!!", "has no words"),
        ("dog " * 101, "at most 100 words"),
        ("x" * 1001, "at most 1000 characters"),
    ],
)
def test_captions_with_words_the_model_lacks_are_refused_by_name(tiny_captioner, example_images, caption, message):
    with pytest.raises(ValueError, match=message):
        tiny_captioner.explain(example_images[0], caption=caption)


def test_prompts_with_unknown_words_are_refused_before_any_work(tiny_captioner):
    with pytest.raises(ValueError, match="doesn't know the word 'zebra'"):
        tiny_captioner.explain(b"not even an image", prefix="a zebra")


# ---- a model that learned to name two objects looks at the right one for each word ------------------

# Each picture: a coloured ball in one quadrant and a black shape in another. The caption names the ball's
# colour and the shape's kind, "a red ball and a black triangle", so each of those two words is about one
# object only, and its heat must lie in that object's quadrant, not in the other's.
QUADRANTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (column, row) of the 112x112 quarters of a 224x224 picture
TRAIN_PICTURES, TEST_PICTURES = 160, 24
COLOUR_WORD, SHAPE_WORD = 1, 6  # positions in "a red ball and a black triangle"


def draw_two_objects(rng: random.Random) -> tuple[Image.Image, str, tuple[int, int]]:
    """-> the picture, its caption, and the quadrants of (the ball, the shape)."""
    image = Image.new("RGB", (224, 224), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    ball_quadrant, shape_quadrant = rng.sample(range(4), 2)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    for quadrant, kind, fill in [
        (ball_quadrant, "circle", tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])),
        (shape_quadrant, shape, (rng.randint(30, 90),) * 3),
    ]:
        radius = rng.randint(24, 42)
        column, row = QUADRANTS[quadrant]
        cx, cy = 112 * column + rng.randint(radius + 4, 108 - radius), 112 * row + rng.randint(radius + 4, 108 - radius)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image, f"a {colour} ball and a black {shape}", (ball_quadrant, shape_quadrant)


def quadrant_share(heat: np.ndarray, quadrant: int) -> float:
    column, row = QUADRANTS[quadrant]
    return float(heat[112 * row : 112 * (row + 1), 112 * column : 112 * (column + 1)].sum() / max(heat.sum(), 1e-9))


@pytest.fixture(scope="module")
def two_object_captioner() -> Captioner:
    """The merge model trained on 160 drawn pictures' ImageNet MobileNetV2 features (~20 s)."""
    rng = random.Random(0)
    pictures = [draw_two_objects(rng) for _ in range(TRAIN_PICTURES)]
    vocab = Vocabulary(["a", "and", "ball", "black", *COLOURS, *SHAPES])
    encoder = ImageEncoder("mobilenet_v2")
    features = np.concatenate([
        encoder.encode_pixels(np.stack([np.asarray(p, np.float32) for p, _, _ in pictures[i : i + 32]]))
        for i in range(0, len(pictures), 32)
    ])
    tokens = np.array([vocab.encode(caption) for _, caption, _ in pictures])
    config = ModelConfig("mobilenet_v2", len(vocab), context_length=tokens.shape[1], feature_dim=encoder.feature_dim, units=64)
    keras.utils.set_random_seed(0)
    model = build_caption_model(config, np.random.default_rng(0).normal(size=(len(vocab), 50)).astype("float32"))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit([features, tokens[:, :-1]], tokens[:, 1:], epochs=25, batch_size=32, verbose=0)
    captioner = Captioner(model, vocab, config, encoder_weights="imagenet")
    captioner.encoder = encoder  # the one already built
    return captioner


@needs_imagenet_mobilenet
def test_each_word_is_explained_by_the_object_it_names(two_object_captioner):
    rng = random.Random(1)
    shares = {"own": [], "other": []}
    correct = 0
    for _ in range(TEST_PICTURES):
        picture, caption, quadrants = draw_two_objects(rng)
        explanation = two_object_captioner.explain(picture, options=GREEDY)
        if explanation.text != caption:
            continue  # only a caption the model got right says which object each word is about
        correct += 1
        for position, own, other in [(COLOUR_WORD, *quadrants), (SHAPE_WORD, *quadrants[::-1])]:
            heat = explanation.heatmap(position)
            shares["own"].append(quadrant_share(heat, own))
            shares["other"].append(quadrant_share(heat, other))
    own, other = np.array(shares["own"]), np.array(shares["other"])
    print(f"{correct}/{TEST_PICTURES} captions right; heat in the named object's quadrant {own.mean():.2f} "
          f"(min {own.min():.2f}), in the other object's {other.mean():.2f}; chance 0.25")
    assert correct >= 0.8 * TEST_PICTURES
    assert own.mean() >= 0.6  # most of each word's heat lies in its object's corner
    assert (own > other).mean() >= 0.9  # and, word by word, more there than on the other object
    assert other.mean() <= 0.2


# ---- the benchmark runs (its figures are for a quiet machine, not for a test) ----------------------


def test_the_explain_benchmark_runs(tiny_weights, example_images, tmp_path, capsys):
    from benchmarks import explain as benchmark

    out = tmp_path / "explain.json"
    assert benchmark.main(["--weights", str(tiny_weights), "--images", *map(str, example_images[:2]), "--repeats", "1",
                           "--json", str(out)]) == 0
    assert "explain() vs caption()" in capsys.readouterr().out
    results = json.loads(out.read_text())
    for setting in ("greedy", "beam5_lp2 (recommended)"):
        assert results[setting]["explain_p50_ms"] > 0 and results[setting]["explain_vs_caption"] > 0
    assert results["overlay_one_word_ms"] > 0 and isinstance(results["target_pass"], bool)
