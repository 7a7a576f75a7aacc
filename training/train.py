"""Step 4: train the caption model on cached features.

    python -m training.train [--encoder mobilenet_v2] [--work-dir artifacts] [--out weights]

Each caption is fed once, with all its prefixes scored at once (the LSTM's
per-step outputs): the original one-prefix-per-sample objective at a fraction
of the cost. Adam 1e-3, cross-entropy on the next word, early stopping on the
dev split with the best epoch's weights kept. Re-running resumes an interrupted
run from its last finished epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioner.decoding import DecodingOptions
from captioner.inference import Captioner
from captioner.encoder import ENCODERS
from captioner.model import ModelConfig, build_caption_model
from captioner.vocabulary import Vocabulary, normalize_caption
from captioner.weights import BUNDLED_WEIGHTS, VOCAB_FILE, WEIGHTS_FILE, write_config
from training.config import option, parse_config
from training.features import encoder_weights_file, features_dir, load_features
from training.finetune import start_from
from training.prepare import DEFAULT_WORK_DIR


def read_log(path: Path) -> dict[str, list[float]]:
    """The CSVLogger's file -> {metric: [value per epoch]} ({} if absent)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) for row in rows] for key in rows[0] if key != "epoch"} if rows else {}


def mirror_caption(caption: str) -> str:
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in normalize_caption(caption))


def make_sequences(vocab: Vocabulary, captions: dict[str, list[str]], names: list[str], length: int):
    """-> feature row per caption, input ids (<start> w1 .. wn), target ids (w1 .. wn <end>), target weights.

    Targets that are <unk> get weight 0: the model is never taught to say "unknown".
    """
    rows, inputs, targets = [], [], []
    for row, name in enumerate(names):
        for caption in captions[name]:
            ids = vocab.encode(caption)[: length + 1]
            padded = np.zeros(length + 1, np.int32)
            padded[: len(ids)] = ids
            rows.append(row)
            inputs.append(padded[:-1])
            targets.append(padded[1:])
    targets = np.stack(targets)
    weights = ((targets != vocab.pad_id) & (targets != vocab.unk_id)).astype(np.float32)
    return np.array(rows), np.stack(inputs), targets, weights


def caption_batches(features, rows, inputs, targets, weights, batch_size: int, shuffle: bool, seed: int = 0) -> tf.data.Dataset:
    """Batches of captions of similar length, cut to their longest caption.

    Captions average 13 tokens but the longest has 38: padding every batch to
    38 would make the LSTM spend most of its time on padding.
    """
    lengths = (inputs != 0).sum(axis=1)
    rng = np.random.default_rng(seed)

    def epoch():
        order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
        # Sort by length within windows of 50 batches: similar lengths per batch, still random across epochs.
        window = batch_size * 50
        order = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))])
        batches = np.split(order, range(batch_size, len(order), batch_size))
        for i in rng.permutation(len(batches)) if shuffle else range(len(batches)):
            index = batches[i]
            steps = int(lengths[index].max())
            w = weights[index, :steps]
            # Keras averages the loss over every position, padding included: rescale so it is the mean per word.
            yield (features[rows[index]], inputs[index, :steps]), targets[index, :steps], w * (w.size / max(w.sum(), 1.0))

    signature = (
        (tf.TensorSpec((None, features.shape[1]), tf.float32), tf.TensorSpec((None, None), tf.int32)),
        tf.TensorSpec((None, None), tf.int32),
        tf.TensorSpec((None, None), tf.float32),
    )
    batches = tf.data.Dataset.from_generator(epoch, output_signature=signature)
    # Telling Keras the number of batches gives it a progress bar with an end, and no "ran out of data" warning.
    return batches.apply(tf.data.experimental.assert_cardinality(-(-len(rows) // batch_size))).prefetch(4)


class DevCaptionScores(keras.callbacks.Callback):
    """Captions the dev images after each epoch as the app does by default (DecodingOptions' defaults),
    and logs their BLEU-4 and CIDEr (as dev_bleu4, dev_cider), so early stopping can follow the scores
    that matter rather than the loss. References are normalised the way the vocabulary is."""

    def __init__(self, vocab: Vocabulary, config: ModelConfig, features: np.ndarray, references: list[list[str]]):
        super().__init__()
        self.vocab, self.config, self.features = vocab, config, features
        self.references = {i: [" ".join(normalize_caption(r)) for r in refs] for i, refs in enumerate(references)}

    def on_epoch_end(self, epoch, logs=None):
        logs.update(self.scores(self.model))

    def scores(self, model: keras.Model, options: DecodingOptions | None = None) -> dict[str, float]:
        """{"dev_bleu4", "dev_cider"} of `model`'s dev captions (the self-critical step scores its epochs here too)."""
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider

        best = Captioner(model, self.vocab, self.config).caption_features(self.features, options)
        captions = {i: [caption.text] for i, caption in enumerate(best)}
        return {"dev_bleu4": float(Bleu(4).compute_score(self.references, captions, verbose=0)[0][3]),
                "dev_cider": float(Cider().compute_score(self.references, captions)[0])}


def export_weights(config: ModelConfig, checkpoint: Path) -> None:
    """Rewrite the kept checkpoint with the model's weights alone: a compiled model's file also
    holds the optimizer's state, which triples its size and is of no use to the app."""
    model = build_caption_model(config)
    model.load_weights(checkpoint)
    model.save_weights(checkpoint)


def plot_history(history: dict, best_epoch: int, path: Path, scst_best_epoch: int | None = None) -> None:
    """Cross-entropy loss and dev scores per epoch; with the self-critical step's entries (training/scst.py),
    a third panel for its epochs (0: the cross-entropy model it started from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = (["loss"] if "loss" in history else []) + (["scst"] if "scst_dev_cider" in history else [])
    fig, axes = plt.subplots(1, 2 * ("loss" in stages) + ("scst" in stages), figsize=(4.5 * (2 * ("loss" in stages) + ("scst" in stages)), 3.5), dpi=100, squeeze=False)
    axes = list(axes[0])
    decoding = DecodingOptions()
    decoding_text = "greedy" if decoding.method == "greedy" else f"beam {decoding.beam_width}, length penalty {decoding.length_penalty:g}"
    if "loss" in stages:
        loss_ax, score_ax = axes.pop(0), axes.pop(0)
        epochs = range(1, len(history["loss"]) + 1)
        loss_ax.plot(epochs, history["loss"], marker="o", label="train")
        loss_ax.plot(epochs, history["val_loss"], marker="o", label="dev")
        loss_ax.set(xlabel="epoch", ylabel="cross-entropy per word", title="Loss")
        score_ax.plot(epochs, history["dev_cider"], marker="o", label="CIDEr")
        score_ax.plot(epochs, history["dev_bleu4"], marker="o", label="BLEU-4")
        score_ax.set(xlabel="epoch", title=f"Dev scores ({decoding_text})")
        for ax in (loss_ax, score_ax):
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
            ax.legend()
    if "scst" in stages:
        ax = axes.pop(0)
        epochs = range(len(history["scst_dev_cider"]))
        ax.plot(epochs, history["scst_dev_cider"], marker="o", label="dev CIDEr")
        ax.plot(epochs, history["scst_dev_bleu4"], marker="o", label="dev BLEU-4")
        ax.plot(epochs[1:], history["scst_train_reward"], marker=".", linestyle="--", label="train reward (CIDEr-D)")
        if scst_best_epoch is not None:
            ax.axvline(scst_best_epoch, color="grey", linestyle=":", label=f"kept (epoch {scst_best_epoch})")
        ax.set(xlabel="self-critical epoch (0: the cross-entropy model)", title=f"Self-critical training ({decoding_text})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="center right")  # between the reward climbing above and the scores below
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class TrainConfig:
    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (dataset.json, features)")
    out: Path = option(BUNDLED_WEIGHTS, "the weights folder to write")
    encoder: str = option("efficientnet_lite0", "whose cached features to train on", choices=sorted(ENCODERS))
    epochs: int = option(30, "upper bound; early stopping usually ends sooner")
    batch_size: int = option(64, "captions per batch")
    patience: int = option(1, "epochs without a better dev score before stopping: the first worse epoch ends it, as self-critical training gains more from the time")
    monitor: str = option("dev_cider", "what early stopping and the kept checkpoint follow on the dev split",
                          choices=["dev_cider", "dev_bleu4", "val_loss"])
    flip: bool = option(False, "also train on the mirrored images (needs features --flip)")
    dropout: float = option(0.3, "the architecture's dropout")
    seed: int = option(1234, "seeds the weights' initialisation and the batches' order")
    learning_rate: float = option(1e-3, "Adam's learning rate")
    init_from: Path | None = option(None, "fine-tune this weights folder instead of starting from random weights "
                                          "(its vocabulary extended by training.prepare --init-from; training/finetune.py)")


def train(config: TrainConfig) -> dict:
    work_dir, out, encoder, epochs, batch_size = Path(config.work_dir), Path(config.out), config.encoder, config.epochs, config.batch_size
    patience, seed, dropout, monitor, flip = config.patience, config.seed, config.dropout, config.monitor, config.flip
    learning_rate, init_from = config.learning_rate, config.init_from
    encoder_info = json.loads((features_dir(work_dir, encoder) / "encoder.json").read_text())
    encoder_weights = "random" if encoder_info["random_weights"] else "imagenet"
    keras.utils.set_random_seed(seed)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    vocab = Vocabulary.load(work_dir / "vocab.json")
    embedding = np.load(work_dir / "embedding.npy")
    train_features, train_names = load_features(work_dir, encoder, "train")
    dev_features, dev_names = load_features(work_dir, encoder, "dev")
    length = dataset["max_length"] - 1  # steps per caption: max_length tokens give max_length - 1 predictions
    rows, x_text, y, w = make_sequences(vocab, dataset["splits"]["train"], train_names, length)
    if flip:  # the mirrored images as a second training view, their captions' left and right swapped
        flipped_features, flipped_names = load_features(work_dir, encoder, "train_flipped")
        assert flipped_names == train_names
        flipped_captions = {name: [mirror_caption(c) for c in caps] for name, caps in dataset["splits"]["train"].items()}
        flipped_rows, *flipped = make_sequences(vocab, flipped_captions, train_names, length)
        rows = np.concatenate([rows, flipped_rows + len(train_names)])  # rows of the flipped features
        x_text, y, w = (np.concatenate(pair) for pair in zip((x_text, y, w), flipped))
        train_features = np.concatenate([train_features, flipped_features])
    dev_rows, dev_text, dev_y, dev_w = make_sequences(vocab, dataset["splits"]["dev"], dev_names, length)

    config = ModelConfig(encoder=encoder, vocab_size=len(vocab), context_length=dataset["max_length"],
                         feature_dim=train_features.shape[1], dropout=dropout)
    if init_from is None:
        model = build_caption_model(config, embedding)
    else:  # the folder's network and weights, its vocabulary grown to the work dir's
        model, config = start_from(init_from, config, vocab, embedding)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / WEIGHTS_FILE
    mode = "min" if monitor == "val_loss" else "max"
    better = min if mode == "min" else max
    dev_references = [dataset["splits"]["dev"][name] for name in dev_names]
    # The backup and log of an interrupted run are resumed only by the same run: same settings, same dataset.
    run_key = hashlib.sha256(json.dumps([asdict(config) | {"out": None}, dataset["vocabulary"], dataset.get("limit")],
                                        default=str).encode()).hexdigest()[:12]
    backup_dir, log_file = work_dir / f"train_backup_{encoder}_{run_key}", work_dir / f"train_log_{encoder}_{run_key}.csv"
    if not backup_dir.exists():  # a fresh run, not a resumed one
        log_file.unlink(missing_ok=True)
    earlier = read_log(log_file)  # epochs finished before an interruption
    callbacks = [  # in this order: the dev scores are logged before the others read them
        DevCaptionScores(vocab, config, dev_features, dev_references),
        keras.callbacks.BackupAndRestore(str(backup_dir)),  # resumes an interrupted run at its last epoch
        keras.callbacks.ModelCheckpoint(
            str(checkpoint), monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True,
            initial_value_threshold=better(earlier[monitor]) if earlier else None,
        ),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience),
        keras.callbacks.CSVLogger(str(log_file), append=True),
    ]
    started = time.time()
    model.fit(
        caption_batches(train_features, rows, x_text, y, w, batch_size, shuffle=True, seed=seed),
        validation_data=caption_batches(dev_features, dev_rows, dev_text, dev_y, dev_w, 256, shuffle=False),
        epochs=epochs, callbacks=callbacks, verbose=2, shuffle=False,  # caption_batches shuffles
    )
    seconds = time.time() - started

    export_weights(config, checkpoint)
    history = read_log(log_file)  # every epoch, also those before a resume
    best_epoch = history[monitor].index(better(history[monitor])) + 1
    shutil.copy(work_dir / "vocab.json", out / VOCAB_FILE)
    training_facts = {
        "dataset": f"{dataset['dataset']['name']} ({dataset['dataset']['split_rule']}"
                   + (f", first {dataset['limit']} images of each)" if dataset.get("limit") else ")"),
        "train_images": len(train_names), "train_sequences": len(rows),
        "epochs_run": len(history["loss"]), "early_stopping": f"{monitor} on the dev split, patience {patience}",
        "best_epoch": best_epoch, "dev_scores_at_best_epoch": {k: round(history[k][best_epoch - 1], 4) for k in ("val_loss", "dev_bleu4", "dev_cider")},
        "batch_size": batch_size, "mirrored_images": flip, "optimizer": f"Adam({learning_rate:g})", "seed": seed, "train_seconds": round(seconds, 1),
        "vocabulary_min_count": dataset["vocabulary"]["min_count"],
    }
    if init_from is not None:
        training_facts |= {"fine_tuned_from": str(init_from), "words_added": len(dataset["vocabulary"]["added_words"])}
    # A converted encoder's weights file (EfficientNet-Lite) travels with the folder, checksummed.
    write_config(out, config, encoder_weights=encoder_weights, encoder_file=encoder_weights_file(work_dir, encoder),
                 training=training_facts)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_history(history, best_epoch, out / "history.png")
    return training_facts


def main(argv=None):
    print(json.dumps(train(parse_config(TrainConfig, argv, __doc__)), indent=1))


if __name__ == "__main__":
    main()
