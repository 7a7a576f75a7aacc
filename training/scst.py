"""Step 4b: self-critical sequence training, after cross-entropy.

    python -m training.scst [--work-dir artifacts] --weights IN --out OUT [--epochs 9] [--patience 5] [--dropout]

Fine-tunes a cross-entropy model (the weights folder IN, e.g. what training.train wrote) to write the captions
that score best, rather than the likeliest next word: the "new self-critical" variant (Luo 2020, "A better
variant of self-critical sequence training"). For each training image the model samples K = 5 captions; each
is rewarded with its CIDEr-D against the image's references (document frequencies from all training references,
training/cider.py), and its baseline is the mean reward of the image's other K - 1 samples, so no greedy decode
is needed and a caption is pushed up exactly when it beats its siblings. The loss is minus the advantage times
the sampled tokens' log-probabilities, up to and including <end>.

Sampling is decoding's own (captioner.decoding's SamplingDecoder, on the NumPy step model), drawing from the
model's whole distribution over the tokens the vocabulary allows (never <pad>, <start> or <unk>, and no <end>
first); the log-probabilities come from one teacher-forced pass of the Keras model under a gradient tape,
renormalised over the same allowed tokens (Vocabulary.allowed_tokens), so the gradient is that of the
distribution actually sampled. The architecture is captioner.model's, unchanged: the
GloVe embedding stays frozen. Adam, learning rate 1.5e-4: three times Luo's 5e-5, which reaches the same dev
CIDEr in a third of the epochs here (0.518 after 9 epochs against 0.519 after 25), so the whole recipe fits in
half an hour on a 2-core CPU.

After each epoch the dev images are captioned as the app does (DecodingOptions' defaults) and the epoch with the
best dev CIDEr is kept (epoch 0, the starting model, if none beats it); training stops after `patience` epochs
without a better one. OUT gets the kept weights, IN's other files, config.json with the self-critical facts
added, and history.json with IN's history plus `scst_*` entries: scst_dev_cider and scst_dev_bleu4 per epoch
0..E (0: the starting model), scst_train_reward (the mean CIDEr-D of the samples) and scst_seconds per epoch
1..E. IN may be OUT.

Every epoch's weights and optimizer state are saved in the work dir, so re-running the same command continues
from the last finished epoch; samples and dropout are seeded per epoch, so a resumed run gives the same result
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from captioner.decoding import DecodingOptions, DecodingTask, limit_blas_threads
from captioner.model import ModelConfig, StepModel, build_caption_model
from captioner.vocabulary import SPECIAL_TOKENS, Vocabulary, normalize_caption
from captioner.weights import (CARD_FILE, CONFIG_FILE, HISTORY_FILE, METRICS_FILE, METRICS_TABLE_FILE, WEIGHTS_FILE,
                               load_vocabulary, read_folder, sha256)
from training.cider import CiderD
from training.config import option, parse_config
from training.features import load_features
from training.prepare import DEFAULT_WORK_DIR
from training.train import DevCaptionScores, plot_history


@dataclass(frozen=True)
class SelfCriticalConfig:
    """The self-critical step's options; the defaults are the recipe."""

    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (dataset.json, features); the run's state goes here")
    weights: Path = option(Path("weights"), "the cross-entropy model's weights folder")
    out: Path = option(Path("weights"), "the weights folder to write (may be --weights: it is replaced at the end)")
    epochs: int = option(9, "upper bound: with the learning rate below, dev CIDEr peaks about here (0.518 at epoch 9; 0.511, 0.507, 0.514 at 10-12)")
    patience: int = option(5, "epochs without a better dev CIDEr before stopping")
    samples_per_image: int = option(5, "K: each sample's baseline is the mean reward of the image's other K - 1")
    images_per_batch: int = option(50, "images per update (each with its K samples)")
    learning_rate: float = option(1.5e-4, "Adam's learning rate")
    dropout: bool = option(False, "keep dropout on in the gradient pass (the samples come from the dropout-free model)")
    seed: int = option(1234, "seeds the samples' order and draws, and dropout")
    reward_end: bool = option(False, "score <end> as a word of the caption and of its references, so that a "
                                     "caption rewarded for its n-grams must also end where captions end")

    def __post_init__(self):
        if self.samples_per_image < 2:
            raise ValueError("samples_per_image must be at least 2: each sample's baseline is the others' mean reward")
        if self.epochs < 1 or self.images_per_batch < 1 or self.patience < 1:
            raise ValueError("epochs, images_per_batch and patience must be at least 1")


# The gradient pass runs the batch's captions in this many groups of similar length (see SelfCriticalStep).
GRADIENT_CHUNKS = 3
# What decides each epoch's work (not where the run stops): a run resumes only under the same values.
TRAJECTORY_SETTINGS = ("samples_per_image", "images_per_batch", "learning_rate", "dropout", "seed", "reward_end")
# The samples come from the model's whole distribution, with no temperature, no nucleus and no rule on repeated
# words: the gradient pass scores them under that distribution, so the policy gradient is that of the policy sampled.
SAMPLING = DecodingOptions("sample", temperature=1.0, top_p=1.0, repeat_words=True)


# ---- the pieces --------------------------------------------------------------------------------------


def sample_captions(step_model: StepModel, vocab: Vocabulary, features: np.ndarray, samples_per_image: int,
                    max_new_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample captions from the model with decoding's sampler (SAMPLING), `samples_per_image` per image (rows
    image-major: image i's are rows i*K .. i*K+K-1), drawn from `rng`.

    -> tokens (n*K, t) int32 (after a caption's end: padding) and lengths (n*K,): tokens up to and including
    <end>, or max_new_tokens for a caption that never ended.
    """
    task = DecodingTask(step_model, vocab, SAMPLING, max_new_tokens)
    captions = [h.tokens for samples in task.run(features, rng=rng, samples_per_image=samples_per_image) for h in samples]
    lengths = np.array([len(caption) for caption in captions])
    tokens = np.full((len(captions), lengths.max()), vocab.pad_id, np.int32)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = caption
    return tokens, lengths


def leave_one_out_advantages(rewards: np.ndarray) -> np.ndarray:
    """(images, K) rewards -> each reward minus the mean reward of the image's other K - 1 samples."""
    k = rewards.shape[1]
    baselines = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - baselines


def words_per_caption(tokens: np.ndarray, lengths: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """The words of each sampled caption: its tokens less the final <end>."""
    ended = tokens[np.arange(len(tokens)), lengths - 1] == vocab.end_id
    return lengths - ended


class CaptionReward:
    """The reward of sampled captions: CIDEr-D against their images' references (training/cider.py), in the
    model's words. end: <end> counts as a word on both sides (SelfCriticalConfig.reward_end), so the n-grams
    that end a caption are scored too: without it, a caption that stops on "... sitting on a" loses nothing for
    stopping there, and self-critical training learns such endings."""

    def __init__(self, references: Iterable[Sequence[str]], vocab: Vocabulary, end: bool):
        self.vocab, self.end = vocab, end
        ending = [vocab.itos[vocab.end_id]] if end else []
        self.cider = CiderD([[" ".join(normalize_caption(c) + ending) for c in captions] for captions in references], vocab.itos)

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray, images: np.ndarray) -> np.ndarray:
        """tokens (n, t) and lengths (n,) as sample_captions returns them; images (n,): each one's references."""
        return self.cider.score_ids(tokens, lengths if self.end else words_per_caption(tokens, lengths, self.vocab), images)


def teacher_forcing_inputs(tokens: np.ndarray, lengths: np.ndarray, vocab: Vocabulary):
    """-> (inputs: <start> then the sampled tokens, shifted; targets; mask of the positions that count)."""
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    targets = np.where(mask, tokens, vocab.pad_id).astype(np.int32)
    inputs = np.concatenate([np.full((len(tokens), 1), vocab.start_id, np.int32), targets[:, :-1]], axis=1)
    return inputs, targets, mask.astype(np.float32)


class SelfCriticalStep:
    """One update: minus advantage times the sampled captions' log-probabilities, from teacher-forced passes."""

    def __init__(self, model: keras.Model, vocab: Vocabulary, learning_rate: float, dropout: bool):
        self.model, self.dropout = model, dropout
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(model.trainable_variables)
        self.allowed = tf.constant(vocab.allowed_tokens().astype(np.float32))
        self.allowed_first = tf.constant(vocab.allowed_tokens(first=True).astype(np.float32))
        signature = [tf.TensorSpec((None, model.inputs[0].shape[1]), tf.float32), tf.TensorSpec((None, None), tf.int32),
                     tf.TensorSpec((None, None), tf.int32), tf.TensorSpec((None, None), tf.float32),
                     tf.TensorSpec((None,), tf.float32), tf.TensorSpec((), tf.float32)]
        self.gradients = tf.function(self._gradients, input_signature=signature)  # one trace for every batch shape

    def sequence_log_probs(self, features, inputs, targets, mask, training: bool):
        """Sum over each caption's tokens of log p(token | prefix, image), p renormalised over the allowed tokens."""
        probs = self.model([features, inputs], training=training)
        first = tf.range(tf.shape(inputs)[1]) == 0
        allowed = tf.where(first[:, None], self.allowed_first[None, :], self.allowed[None, :])  # (t, vocab)
        chosen = tf.gather(probs, targets, axis=2, batch_dims=2)
        total = tf.reduce_sum(probs * allowed[None], axis=2)
        log_probs = tf.math.log(tf.maximum(chosen, 1e-30)) - tf.math.log(tf.maximum(total, 1e-30))
        return tf.reduce_sum(log_probs * mask, axis=1)

    def _gradients(self, features, inputs, targets, mask, advantages, captions):
        """The loss's share of these captions, -sum(advantage x log-probability) / captions in the batch, and its gradients."""
        with tf.GradientTape() as tape:
            log_probs = self.sequence_log_probs(features, inputs, targets, mask, self.dropout)
            loss = -tf.reduce_sum(advantages * log_probs) / captions
        return loss, tape.gradient(loss, self.model.trainable_variables)

    def __call__(self, features, tokens, lengths, advantages, vocab: Vocabulary) -> float:
        """One update on a batch of sampled captions; -> the loss, minus the mean of advantage x log-probability.

        The batch goes through the network in GRADIENT_CHUNKS groups of similar length, each cut to its longest
        caption, and their gradients are summed: less work on padding (2-core CPU: 0.61 -> 0.41 s per 250 captions).
        """
        order = np.argsort(lengths, kind="stable")
        captions, loss, gradients = tf.constant(float(len(tokens))), 0.0, None
        for part in np.array_split(order, min(GRADIENT_CHUNKS, len(order))):
            steps = int(lengths[part].max())
            inputs, targets, mask = teacher_forcing_inputs(tokens[part, :steps], lengths[part], vocab)
            part_loss, part_gradients = self.gradients(
                tf.constant(features[part], tf.float32), tf.constant(inputs), tf.constant(targets), tf.constant(mask),
                tf.constant(advantages[part], tf.float32), captions)
            loss += float(part_loss)
            gradients = part_gradients if gradients is None else [g + p for g, p in zip(gradients, part_gradients)]
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        return loss


# ---- resumable state -----------------------------------------------------------------------------------


class RunState:
    """The run's progress in the work dir: state.json plus each kept epoch's weights and the optimizer's state.

    Written epoch by epoch, files first and state.json last (atomically), so an interruption at any point
    leaves the state of the last finished epoch.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "state.json"

    def load(self) -> dict | None:
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def save(self, state: dict) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=1) + "\n")
        temporary.replace(self.path)
        keep = {f"epoch_{state['epochs_done']}.weights.h5", f"epoch_{state['best_epoch']}.weights.h5",
                f"epoch_{state['epochs_done']}.optimizer.npz", "state.json"}
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink()

    def weights(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch}.weights.h5"

    def optimizer(self, epoch: int) -> Path:
        return self.folder / f"epoch_{epoch}.optimizer.npz"


def state_folder(work_dir: Path, out: Path) -> Path:
    """One state folder per output folder, so runs into different folders never share one."""
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return work_dir / "scst_state" / f"{out.name}-{key}"


def save_optimizer(optimizer: keras.optimizers.Optimizer, path: Path) -> None:
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, *[np.asarray(v) for v in optimizer.variables])
    temporary.replace(path)


def load_optimizer(optimizer: keras.optimizers.Optimizer, path: Path) -> None:
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"{path} holds {len(values)} optimizer variables, the optimizer has {len(optimizer.variables)}")
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)


# ---- the step ------------------------------------------------------------------------------------------


def self_critical(config: SelfCriticalConfig) -> dict:
    """Fine-tune the model in config.weights with self-critical training; write the kept epoch to config.out.

    -> the facts recorded in config.json's training.self_critical."""
    work_dir, weights, out = Path(config.work_dir), Path(config.weights), Path(config.out)
    limit_blas_threads()  # the sampler's small matrix products: much faster single-threaded (see decoding.py)
    folder = read_folder(weights)  # refuses a folder whose checksums don't match
    model_config, vocab = folder.config, load_vocabulary(folder)
    # The samples come from the model's distribution over the tokens the vocabulary allows, which the gradient pass
    # renormalises over; the rule on endings (decoding.NoCutOffEnding) is serving's, and the dev scores' (as the app).
    sampled_vocab = Vocabulary(vocab.itos[len(SPECIAL_TOKENS):])
    input_sha = sha256(weights / WEIGHTS_FILE)
    state_dir = state_folder(work_dir, out)
    run = RunState(state_dir)
    state = run.load()
    own_output = bool(state) and state["output_sha256"] == input_sha  # IN = OUT, already written by this run
    if state and (not own_output and state["input_sha256"] != input_sha or state["config"] != trajectory_settings(config)):
        print(f"{state_dir} holds a run from other weights or settings: starting afresh")
        state = None
    if state:  # epochs and patience only say where to stop: a finished run given more of them continues
        state["finished"] = stopping(state, config)
    if state is None:
        shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    dataset = json.loads((work_dir / "dataset.json").read_text())
    train_features, train_names = load_features(work_dir, model_config.encoder, "train")
    dev_features, dev_names = load_features(work_dir, model_config.encoder, "dev")
    if train_features.shape[1] != model_config.feature_dim:
        raise ValueError(f"{work_dir}'s {model_config.encoder} features have {train_features.shape[1]} dimensions, "
                         f"the model in {weights} takes {model_config.feature_dim}")
    # The reward's references and document frequencies: every training image's captions, in the model's words.
    train_split = dataset["splits"]["train"]
    reward = CaptionReward(train_split.values(), vocab, config.reward_end)
    reward_row = {name: row for row, name in enumerate(train_split)}
    reward_image = np.array([reward_row[name] for name in train_names], dtype=np.int64)
    dev = DevCaptionScores(vocab, model_config, dev_features, [dataset["splits"]["dev"][name] for name in dev_names])

    model = build_caption_model(model_config)
    model.load_weights(weights / WEIGHTS_FILE)
    step = SelfCriticalStep(model, sampled_vocab, config.learning_rate, config.dropout)
    if state is None:
        started = time.perf_counter()
        scores = dev.scores(model)
        model.save_weights(run.weights(0))
        save_optimizer(step.optimizer, run.optimizer(0))
        state = {"input_sha256": input_sha, "config": trajectory_settings(config), "epochs_done": 0, "best_epoch": 0,
                 "finished": False, "output_sha256": None,
                 "history": {"scst_dev_cider": [scores["dev_cider"]], "scst_dev_bleu4": [scores["dev_bleu4"]],
                             "scst_train_reward": [], "scst_seconds": []}}
        run.save(state)
        print(f"epoch 0 (the starting model): dev CIDEr {scores['dev_cider']:.4f}, BLEU-4 {scores['dev_bleu4']:.4f} "
              f"({time.perf_counter() - started:.0f} s)")
    else:
        model.load_weights(run.weights(state["epochs_done"]))
        load_optimizer(step.optimizer, run.optimizer(state["epochs_done"]))
        print(f"resuming after epoch {state['epochs_done']} (best so far: epoch {state['best_epoch']})")

    history = state["history"]
    while not state["finished"]:
        epoch = state["epochs_done"] + 1
        started = time.perf_counter()
        mean_reward = train_epoch(model, step, sampled_vocab, reward, train_features, reward_image, model_config, config, epoch)
        scores = dev.scores(model)
        seconds = time.perf_counter() - started
        history["scst_dev_cider"].append(scores["dev_cider"])
        history["scst_dev_bleu4"].append(scores["dev_bleu4"])
        history["scst_train_reward"].append(mean_reward)
        history["scst_seconds"].append(round(seconds, 1))
        model.save_weights(run.weights(epoch))
        save_optimizer(step.optimizer, run.optimizer(epoch))
        best = int(np.argmax(history["scst_dev_cider"]))  # the first of equals: fewer epochs
        state.update(epochs_done=epoch, best_epoch=best)
        state["finished"] = stopping(state, config)
        run.save(state)
        print(f"epoch {epoch}: train reward {mean_reward:.4f}, dev CIDEr {scores['dev_cider']:.4f}, "
              f"BLEU-4 {scores['dev_bleu4']:.4f} ({seconds:.0f} s){'  best' if best == epoch else ''}", flush=True)

    return write_output(weights, out, run, state, config, model_config)


def trajectory_settings(config: SelfCriticalConfig) -> dict:
    return {name: getattr(config, name) for name in TRAJECTORY_SETTINGS}


def stopping(state: dict, config: SelfCriticalConfig) -> bool:
    return state["epochs_done"] >= config.epochs or state["epochs_done"] - state["best_epoch"] >= config.patience


def train_epoch(model, step: SelfCriticalStep, vocab: Vocabulary, reward: CaptionReward, features: np.ndarray,
                reward_image: np.ndarray, model_config: ModelConfig, config: SelfCriticalConfig, epoch: int) -> float:
    """One pass over the training images in a seeded random order; -> the mean reward of the samples."""
    rng = np.random.default_rng([config.seed, epoch])  # per epoch: a resumed run draws what it would have drawn
    keras.utils.set_random_seed(config.seed + epoch)  # dropout, if on
    order = rng.permutation(len(features))
    batches = [order[i : i + config.images_per_batch] for i in range(0, len(order), config.images_per_batch)]
    k, rewards = config.samples_per_image, []
    with tqdm(batches, desc=f"self-critical epoch {epoch}", unit="batch") as progress:
        for batch in progress:
            # A new StepModel each batch: the weights change with every update.
            tokens, lengths = sample_captions(StepModel(model), vocab, features[batch], k, model_config.max_new_tokens, rng)
            scores = reward(tokens, lengths, np.repeat(reward_image[batch], k))
            advantages = leave_one_out_advantages(scores.reshape(-1, k)).ravel()
            step(np.repeat(features[batch], k, axis=0), tokens, lengths, advantages, vocab)
            rewards.append(scores)
            progress.set_postfix(reward=f"{np.mean(scores):.3f}")
    return float(np.concatenate(rewards).mean())


def write_output(weights: Path, out: Path, run: RunState, state: dict, config: SelfCriticalConfig,
                 model_config: ModelConfig) -> dict:
    """OUT: IN's files with the kept epoch's weights, config.json's checksums and training facts updated, the
    history extended and plotted. Scores and the model card of IN describe other weights: they are not kept.

    Safe to repeat (a re-run after an interruption here does it again): the state records the output weights'
    checksum before they replace anything, so a re-run with IN = OUT knows them for its own.
    """
    content = json.loads((weights / CONFIG_FILE).read_text())
    in_history = json.loads((weights / HISTORY_FILE).read_text()) if (weights / HISTORY_FILE).is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    for name in content["files"]:
        if name != WEIGHTS_FILE and weights.resolve() != out.resolve():
            shutil.copy(weights / name, out / name)
    for stale in [METRICS_FILE, METRICS_TABLE_FILE, CARD_FILE, *(p.name for p in out.glob("captions_*.json"))]:
        (out / stale).unlink(missing_ok=True)
    already_written = (state.get("output_epoch") == state["best_epoch"] and (out / WEIGHTS_FILE).is_file()
                       and sha256(out / WEIGHTS_FILE) == state["output_sha256"])
    if not already_written:
        model = build_caption_model(model_config)
        model.load_weights(run.weights(state["best_epoch"]))
        temporary = out / f"{WEIGHTS_FILE}.tmp.weights.h5"  # Keras wants the .weights.h5 ending
        model.save_weights(temporary)
        state.update(output_sha256=sha256(temporary), output_epoch=state["best_epoch"])
        run.save(state)
        temporary.replace(out / WEIGHTS_FILE)

    history = {key: value for key, value in in_history.items() if not key.startswith("scst_")} | state["history"]
    best, scst = state["best_epoch"], state["history"]
    facts = {
        "method": "new self-critical (Luo 2020): reward CIDEr-D against the image's references (document frequencies "
                  "from the training references), baseline the mean reward of the image's other samples",
        "samples_per_image": config.samples_per_image, "images_per_batch": config.images_per_batch,
        "optimizer": f"Adam({config.learning_rate:g})", "dropout_in_gradient_pass": config.dropout,
        "epochs_run": state["epochs_done"], "best_epoch": best,
        "early_stopping": f"dev CIDEr (the app's default decoding), patience {config.patience}",
        "dev_cider_start": round(scst["scst_dev_cider"][0], 4), "dev_cider_at_best_epoch": round(scst["scst_dev_cider"][best], 4),
        "dev_bleu4_at_best_epoch": round(scst["scst_dev_bleu4"][best], 4),
        "seed": config.seed, "train_seconds": round(sum(scst["scst_seconds"]), 1),
        "reward_end": config.reward_end,
    }
    content.setdefault("training", {})["self_critical"] = facts
    content["files"] = {name: sha256(out / name) for name in content["files"]}
    (out / CONFIG_FILE).write_text(json.dumps(content, indent=2) + "\n")
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    ce_best = content["training"].get("best_epoch") or (int(np.argmax(history["dev_cider"])) + 1 if history.get("dev_cider") else 0)
    plot_history(history, ce_best, out / "history.png", scst_best_epoch=best)
    read_folder(out)  # the folder is whole and its checksums match
    return facts


def main(argv=None):
    facts = self_critical(parse_config(SelfCriticalConfig, argv, __doc__))
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
