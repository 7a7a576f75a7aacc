"""Self-critical sequence training (training/scst.py) and its reward, CIDEr-D (training/cider.py).

The reward must be the coco-caption toolkit's CIDEr, the baseline the mean of the other samples, the samples
must follow decoding's rules, the gradient pass must score the captions that were sampled, and a small run on
real Flickr8k data must raise the dev CIDEr, resume where it stopped and reproduce itself.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from captioner.model import ModelConfig, StepModel, build_caption_model
from captioner.vocabulary import Vocabulary, normalize_caption
from captioner.weights import HISTORY_FILE, WEIGHTS_FILE, read_folder
from tests.conftest import FLICKR8K, TINY_WORDS
from tests.test_training import needs_flickr8k, needs_imagenet_mobilenet
from training.cider import CiderD
from training.scst import (CaptionReward, SelfCriticalConfig, SelfCriticalStep, leave_one_out_advantages,
                           sample_captions, self_critical, teacher_forcing_inputs, words_per_caption)

# ---- CIDEr-D, the reward ---------------------------------------------------------------------------------


def flickr8k_references(split: str, images: int) -> list[list[str]]:
    from training.flickr8k import read_captions, read_split

    captions = read_captions(FLICKR8K)
    return [[" ".join(normalize_caption(c)) for c in captions[name]] for name in read_split(FLICKR8K, split)[:images]]


def awkward_candidates(references: list[list[str]], seed: int = 0) -> list[str]:
    """For each image a candidate of some kind: its own reference, another image's, cut short, with a phrase
    repeated, one word, words no reference has, or much longer than any reference."""
    rng = random.Random(seed)
    candidates = []
    for i, refs in enumerate(references):
        words = rng.choice(refs if rng.random() < 0.5 else references[rng.randrange(len(references))]).split()
        kind = i % 6
        if kind == 1:
            words = words[: rng.randint(1, len(words))]
        elif kind == 2:
            words = words + words[:3]
        elif kind == 3:
            words = words[:1]
        elif kind == 4:
            words = words[:4] + ["zyzzyva", "quux"]
        elif kind == 5:
            words = words * 4
        candidates.append(" ".join(words))
    return candidates


@needs_flickr8k
def test_cider_d_is_the_coco_caption_cider():
    from pycocoevalcap.cider.cider import Cider

    references = flickr8k_references("dev", 300)
    candidates = awkward_candidates(references)
    mean, per_image = Cider().compute_score({i: refs for i, refs in enumerate(references)},
                                            {i: [c] for i, c in enumerate(candidates)})
    ours = CiderD(references).score(candidates, np.arange(len(references)))
    np.testing.assert_allclose(ours, per_image, rtol=1e-9, atol=1e-12)
    assert ours.mean() == pytest.approx(mean, rel=1e-9)
    assert len(set(np.round(ours, 6))) > 100  # a real spread of scores, not a constant


@needs_flickr8k
def test_cider_d_scores_any_candidates_against_the_document_frequencies_of_its_references():
    # Several candidates for one image, the model's token ids in, and df fixed by the references given.
    references = flickr8k_references("train", 200)
    vocab = Vocabulary(["a", "dog", "runs", "on", "the", "grass", "man", "is"])
    scorer = CiderD(references, vocab.itos)
    sentences = ["a dog runs on the grass", "a man is on the grass", "a dog"]
    ids = [vocab.encode(s, add_special=False) for s in sentences]
    padded = np.zeros((3, 6), np.int64)
    for row, sentence in enumerate(ids):
        padded[row, : len(sentence)] = sentence
    padded[2, 2:] = vocab.end_id  # what follows a caption's length is ignored
    by_ids = scorer.score_ids(padded, np.array([6, 6, 2]), np.array([7, 7, 7]))
    np.testing.assert_allclose(by_ids, scorer.score(sentences, [7, 7, 7]))
    # One image's own reference scores far above another image's.
    own, other = scorer.score([references[7][0], references[8][0]], [7, 7])
    assert own > 2 * other


# ---- the baseline and the loss's pieces ---------------------------------------------------------------


def test_each_samples_baseline_is_the_mean_reward_of_its_images_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    advantages = leave_one_out_advantages(rewards)
    np.testing.assert_allclose(advantages[0], [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    np.testing.assert_allclose(advantages[1], 0.0)  # samples all as good: nothing to learn
    np.testing.assert_allclose(advantages.sum(axis=1), 0.0)  # the baseline is unbiased: advantages cancel out
    # The ordering of rewards is kept: the best sample is pushed up most.
    assert list(np.argsort(advantages[0])) == [0, 1, 2, 3]


def test_with_reward_end_a_caption_is_rewarded_for_where_it_ends():
    """Without it, a caption scores its words alone: stopping at the token budget, or on "... on the" (a caption
    cut short, the n-grams it has all in the references), costs nothing for stopping there. With it, <end> is a
    word on both sides: the same words ended as the references end score more than the budget's cut, and a
    caption that stops mid-phrase loses the n-grams of a proper ending."""
    vocab = Vocabulary(TINY_WORDS)
    # Other images' references: document frequencies need more than one image.
    references = [["a dog runs on the grass", "a dog is running on the grass"], ["a man is in the water"],
                  ["a red ball on the grass"], ["a cat with a blue ball"]]
    def tokens(caption: str, ended: bool) -> tuple[np.ndarray, int]:
        ids = [vocab.stoi[w] for w in caption.split()] + ([vocab.end_id] if ended else [])
        return np.array(ids + [vocab.pad_id] * (12 - len(ids))), len(ids)
    captions = [tokens("a dog runs on the grass", True), tokens("a dog runs on the grass", False),
                tokens("a dog runs on the", True)]
    batch, lengths = np.stack([t for t, _ in captions]), np.array([n for _, n in captions])
    plain = CaptionReward(references, vocab, end=False)(batch, lengths, np.zeros(3, np.int64))
    ended = CaptionReward(references, vocab, end=True)(batch, lengths, np.zeros(3, np.int64))
    assert plain[0] == plain[1]  # its words alone: where it stopped doesn't count
    assert ended[0] > ended[1]
    assert ended[2] / ended[0] < plain[2] / plain[0]  # stopping mid-phrase costs more


def tiny_model(seed: int = 0, sharpen_forbidden: bool = False):
    """A random model over a tiny vocabulary; optionally with the forbidden tokens and <end> made likeliest."""
    import keras

    keras.utils.set_random_seed(seed)
    vocab = Vocabulary(TINY_WORDS)
    config = ModelConfig(encoder="mobilenet_v2", vocab_size=len(vocab), context_length=12, feature_dim=16, units=32)
    model = build_caption_model(config)
    if sharpen_forbidden:
        kernel, bias = model.get_layer("next_word").get_weights()
        bias[[*vocab.forbidden_ids, vocab.end_id]] += 8.0  # each far likelier than any word
        model.get_layer("next_word").set_weights([kernel, bias])
    return model, vocab, config


def allowed_log_probs(logits: np.ndarray, vocab: Vocabulary, first: bool) -> np.ndarray:
    """The model's log-probabilities over the tokens the vocabulary allows a caption (what decoding samples from)."""
    logits = np.where(vocab.allowed_tokens(first), logits.astype(np.float64), -np.inf)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_sampling_never_emits_the_tokens_decoding_forbids():
    model, vocab, config = tiny_model(sharpen_forbidden=True)
    features = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    tokens, lengths = sample_captions(StepModel(model), vocab, features, 5, config.max_new_tokens, np.random.default_rng(1))
    assert tokens.shape[0] == 200
    for row, length in zip(tokens, lengths):
        caption = list(row[:length])
        assert not set(caption) & set(vocab.forbidden_ids), caption  # never <pad>, <start> or <unk>
        assert caption[0] != vocab.end_id  # never an empty caption
        assert vocab.end_id not in caption[:-1]  # <end> only ends it
        assert (row[length:] == vocab.pad_id).all()  # after the end: padding, which the loss ignores
    assert (tokens[np.arange(200), lengths - 1] == vocab.end_id).mean() > 0.9  # <end> is likely: most captions end
    np.testing.assert_array_equal(words_per_caption(tokens, lengths, vocab),
                                  [len(vocab.decode(row[:n]).split()) for row, n in zip(tokens, lengths)])


def test_samples_follow_the_models_distribution():
    model, vocab, config = tiny_model(seed=3)
    features = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    decoder = StepModel(model)
    tokens, _ = sample_captions(decoder, vocab, features, 20000, 1, np.random.default_rng(2))
    logits, _ = decoder.step(decoder.project_image(features), np.array([vocab.start_id]), decoder.initial_state(1))
    expected = np.exp(allowed_log_probs(logits, vocab, first=True))[0]
    observed = np.bincount(tokens[:, 0], minlength=len(vocab)) / len(tokens)
    np.testing.assert_allclose(observed, expected, atol=0.012)  # 20,000 draws: a few standard errors


def test_the_gradient_pass_scores_the_sampled_captions_as_the_sampler_drew_them():
    # The teacher-forced Keras pass, renormalised over the allowed tokens, gives each sampled caption the
    # log-probability the NumPy sampler drew it with: the policy gradient is that of the policy sampled.
    model, vocab, config = tiny_model(seed=5)
    features = np.random.default_rng(4).normal(size=(6, 16)).astype(np.float32)
    decoder = StepModel(model)
    tokens, lengths = sample_captions(decoder, vocab, features, 4, config.max_new_tokens, np.random.default_rng(3))
    image = np.repeat(decoder.project_image(features), 4, axis=0)
    state, previous, expected = decoder.initial_state(len(image)), np.full(len(image), vocab.start_id), np.zeros(len(image))
    for t in range(tokens.shape[1]):
        logits, state = decoder.step(image, previous, state)
        step_log_probs = allowed_log_probs(logits, vocab, first=t == 0)[np.arange(len(image)), tokens[:, t]]
        expected += np.where(t < lengths, step_log_probs, 0.0)
        previous = tokens[:, t]
    inputs, targets, mask = teacher_forcing_inputs(tokens, lengths, vocab)
    step = SelfCriticalStep(model, vocab, 5e-5, dropout=False)
    scored = step.sequence_log_probs(tf.constant(np.repeat(features, 4, axis=0)), tf.constant(inputs),
                                     tf.constant(targets), tf.constant(mask), training=False).numpy()
    np.testing.assert_allclose(scored, expected, rtol=1e-4, atol=1e-4)


def test_a_step_makes_better_than_average_samples_likelier_and_leaves_the_embedding_frozen():
    model, vocab, config = tiny_model(seed=7)
    features = np.random.default_rng(5).normal(size=(8, 16)).astype(np.float32)
    tokens, lengths = sample_captions(StepModel(model), vocab, features, 4, config.max_new_tokens, np.random.default_rng(6))
    advantages = leave_one_out_advantages(np.random.default_rng(7).normal(size=(8, 4))).ravel()
    repeated = np.repeat(features, 4, axis=0)
    step = SelfCriticalStep(model, vocab, 1e-3, dropout=False)
    inputs, targets, mask = (tf.constant(x) for x in teacher_forcing_inputs(tokens, lengths, vocab))
    before = step.sequence_log_probs(tf.constant(repeated), inputs, targets, mask, training=False).numpy()
    embedding = model.get_layer("word_embedding").get_weights()[0].copy()
    step(repeated, tokens, lengths, advantages, vocab)
    after = step.sequence_log_probs(tf.constant(repeated), inputs, targets, mask, training=False).numpy()
    # The step raises the objective, sum(advantage x log-probability): better samples likelier, worse ones less.
    assert np.dot(advantages, after - before) > 0
    np.testing.assert_array_equal(model.get_layer("word_embedding").get_weights()[0], embedding)


# ---- a small run on real data ---------------------------------------------------------------------------

SMALL_RUN_IMAGES = 300  # the first 300 images of the train and dev splits
CE_EPOCHS = 8  # enough that the cross-entropy model describes its training images fairly (dev CIDEr ~0.27)
CE_PATIENCE = 3  # on 300 images dev CIDEr wobbles early on: the recipe's patience 1 would stop at a weak model
SMALL_RUN = dict(images_per_batch=10, learning_rate=1.5e-4)  # the recipe's rate; 30 updates an epoch on 300 images
SMALL_RUN_EPOCHS = 3
# What a 300-image run shows for sure is the reward it optimises: the mean CIDEr-D of its sampled captions rose by
# 0.080 (0.515 -> 0.595) from the first epoch to the third here, and by 0.076-0.13 over three other seeds and
# learning rates from 1.5e-4 to 3e-4 (issue 17). Its dev CIDEr does not: on 300 images it moves by +-0.03 from epoch to epoch, up or down, so
# whether any epoch beats the cross-entropy model is chance; the full recipe's dev gain (README) is its evidence.
MIN_REWARD_GAIN = 0.03


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    """Cross-entropy, then 3 self-critical epochs on 300 Flickr8k training images; and the first 2 again
    in place (OUT = IN) as 1 epoch, then a re-run of the command with 2, which continues it."""
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip(f"no Flickr8k data at {FLICKR8K}")
    from training import glove, prepare, scst, train
    from training.features import FeaturesConfig, extract_features

    root = tmp_path_factory.mktemp("scst")
    work, ce = root / "work", root / "ce"
    prepare.main(["--data", str(FLICKR8K), "--work-dir", str(work), "--limit", str(SMALL_RUN_IMAGES)])
    glove.main(["--work-dir", str(work)])
    extract_features(FeaturesConfig(work, "mobilenet_v2"), splits=("train", "dev"))
    train.main(["--work-dir", str(work), "--out", str(ce), "--encoder", "mobilenet_v2", "--epochs", str(CE_EPOCHS),
                "--patience", str(CE_PATIENCE), "--batch-size", "32"])

    facts = self_critical(SelfCriticalConfig(work_dir=work, weights=ce, out=root / "straight", epochs=SMALL_RUN_EPOCHS,
                                             **SMALL_RUN))
    in_place = Path(shutil.copytree(ce, root / "in_place"))
    argv = ["--work-dir", str(work), "--weights", str(in_place), "--out", str(in_place),
            "--images-per-batch", str(SMALL_RUN["images_per_batch"]), "--learning-rate", str(SMALL_RUN["learning_rate"])]
    scst.main([*argv, "--epochs", "1"])  # as if stopped after epoch 1
    scst.main([*argv, "--epochs", "2"])
    return {"work": work, "ce": ce, "straight": root / "straight", "in_place": in_place, "facts": facts, "argv": argv}


@needs_imagenet_mobilenet
def test_self_critical_training_raises_the_reward_it_optimises_and_scores_every_epoch_on_dev(small_run):
    history = json.loads((small_run["straight"] / HISTORY_FILE).read_text())
    print("train reward per epoch:", [round(r, 4) for r in history["scst_train_reward"]],
          "dev CIDEr per epoch:", [round(c, 4) for c in history["scst_dev_cider"]])
    rewards = history["scst_train_reward"]
    assert rewards[-1] > rewards[0] + MIN_REWARD_GAIN  # its samples' CIDEr-D rises: it optimises its reward
    # Every epoch is scored on dev, and the best one is kept (epoch 0: the cross-entropy model, as training.train
    # scored it, when none beats it).
    ce_history = json.loads((small_run["ce"] / HISTORY_FILE).read_text())
    assert history["scst_dev_cider"][0] == pytest.approx(max(ce_history["dev_cider"]))
    assert len(history["scst_dev_cider"]) == SMALL_RUN_EPOCHS + 1 and min(history["scst_dev_cider"]) > 0
    facts = small_run["facts"]
    assert facts["best_epoch"] == int(np.argmax(history["scst_dev_cider"]))
    assert facts["dev_cider_at_best_epoch"] == pytest.approx(max(history["scst_dev_cider"]), abs=1e-4)


@needs_imagenet_mobilenet
def test_the_output_is_a_whole_weights_folder_with_the_history_extended(small_run):
    out, ce = small_run["straight"], small_run["ce"]
    folder = read_folder(out)  # checksums match
    assert folder.config == read_folder(ce).config  # the same architecture
    content = json.loads((out / "config.json").read_text())
    assert content["training"]["self_critical"]["epochs_run"] == SMALL_RUN_EPOCHS
    assert content["training"]["best_epoch"] == json.loads((ce / "config.json").read_text())["training"]["best_epoch"]
    history = json.loads((out / HISTORY_FILE).read_text())
    assert history["loss"] == json.loads((ce / HISTORY_FILE).read_text())["loss"]  # the cross-entropy epochs kept
    assert len(history["scst_dev_cider"]) == SMALL_RUN_EPOCHS + 1 and len(history["scst_train_reward"]) == SMALL_RUN_EPOCHS
    assert (out / "history.png").read_bytes().startswith(b"\x89PNG")

    def model(folder: Path):
        model = build_caption_model(read_folder(folder).config)
        model.load_weights(folder / WEIGHTS_FILE)
        return model

    trained, start = model(out), model(ce)
    embedding = lambda m: m.get_layer("word_embedding").get_weights()[0]  # noqa: E731
    np.testing.assert_array_equal(embedding(trained), embedding(start))  # GloVe stays frozen
    # The kept weights are the best dev epoch's: the input's own when no epoch beat it.
    unchanged = all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), start.get_weights()))
    assert unchanged == (small_run["facts"]["best_epoch"] == 0)


@needs_imagenet_mobilenet
def test_a_rerun_continues_from_the_last_epoch_and_gives_the_same_result(small_run):
    straight = json.loads((small_run["straight"] / HISTORY_FILE).read_text())
    resumed = json.loads((small_run["in_place"] / HISTORY_FILE).read_text())
    for key in ("scst_dev_cider", "scst_dev_bleu4", "scst_train_reward"):  # epochs 1 and 2 (and 0 for dev scores)
        np.testing.assert_allclose(resumed[key], straight[key][: len(resumed[key])], rtol=1e-6)
    assert len(resumed["scst_train_reward"]) == 2
    read_folder(small_run["in_place"])  # whole, checksums match
    facts = json.loads((small_run["in_place"] / "config.json").read_text())["training"]["self_critical"]
    assert (facts["epochs_run"], facts["best_epoch"]) == (2, int(np.argmax(straight["scst_dev_cider"][:3])))


@needs_imagenet_mobilenet
def test_a_finished_run_is_not_trained_again(small_run, capsys):
    from training import scst

    folder = small_run["in_place"]
    trained = (folder / WEIGHTS_FILE).read_bytes()
    capsys.readouterr()
    scst.main([*small_run["argv"], "--epochs", "2"])
    output = capsys.readouterr().out
    assert "epoch 1:" not in output and "epoch 2:" not in output  # nothing trained
    assert (folder / WEIGHTS_FILE).read_bytes() == trained
    read_folder(folder)
