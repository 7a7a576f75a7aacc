"""Fine-tuning: training starts from a trained weights folder (the bundled model, or any) instead of random weights.

    python -m training.run_all --dataset csv --data captions.csv --images photos/ --init-from weights --out weights-mine

A few hundred captioned photos are far too few to learn captioning from scratch, but enough to move a model that
already captions toward their domain: their objects, their words, their way of describing. So the network stays
captioner/model.py's, exactly, with the folder's weights; only the vocabulary grows:

- prepare keeps the folder's vocabulary, ids unchanged, and appends the new training captions' words seen more than
  --min-count times that it lacks (`extended_vocabulary`);
- a new word's input row is its GloVe vector, like every word's (the embedding stays frozen);
- its output unit (a column of the last Dense layer and its bias) starts as the mean of the units of its
  OUTPUT_UNIT_NEIGHBOURS (5) nearest words in the folder's vocabulary, by the cosine of their GloVe vectors
  (captioner.visual.new_output_units): "giraffe" starts out predicted where the bundled model's "elephant", "goat"
  and "geese" would be, and fine-tuning tells them apart.
  A word GloVe lacks starts from the mean of all the old units.

Training is then training.train's, from these weights (TrainConfig.init_from), at a tenth of the learning rate:
on 149 COCO photos that gains 0.035 held-out CIDEr and costs 0.004 on Flickr8k dev, where 1e-3 gains more on the
new photos and loses a third on Flickr8k (README, `python -m benchmarks.finetune`). The image features must come
from the folder's own encoder, which run_all arranges (its encoder weights file, when it has one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from captioner.model import ModelConfig, build_caption_model
from captioner.visual import new_output_units
from captioner.vocabulary import SPECIAL_TOKENS, Vocabulary, normalize_caption
from captioner.weights import load_vocabulary, read_decoder_weights, read_folder

LEARNING_RATE = 1e-4  # Adam's, a tenth of training from scratch: the folder's knowledge is moved, not overwritten


class FineTuningError(ValueError):
    """The weights folder and the prepared data don't fit together; the message says how to make them."""


def extended_vocabulary(folder: Path, train_captions: list[str], min_count: int) -> tuple[Vocabulary, list[str]]:
    """The folder's vocabulary, then the words of `train_captions` seen more than `min_count` times that it lacks
    (most frequent first, ties alphabetical, as Vocabulary.from_captions orders them) -> (vocabulary, the added words)."""
    base = load_vocabulary(read_folder(folder))
    counts = Counter(word for caption in train_captions for word in normalize_caption(caption))
    added = sorted((w for w, n in counts.items() if n > min_count and w not in base.stoi), key=lambda w: (-counts[w], w))
    return Vocabulary([*base.itos[len(SPECIAL_TOKENS):], *added]), added


def start_from(folder: Path, config: ModelConfig, vocab: Vocabulary, embedding: np.ndarray):
    """The Keras model to fine-tune -> (model, its config): `folder`'s network and weights, grown to `vocab`.

    config: what training would build from scratch (encoder, vocabulary size, context length, dropout); the
    folder's embedding and LSTM sizes replace its defaults. embedding: GloVe's rows for `vocab` (training.glove).
    """
    init = read_folder(folder)
    if (init.config.encoder, init.config.feature_dim) != (config.encoder, config.feature_dim):
        raise FineTuningError(f"{folder} reads {init.config.encoder} features ({init.config.feature_dim}-d), but the "
                              f"work dir's are {config.encoder} ({config.feature_dim}-d): compute the features with "
                              f"--encoder {init.config.encoder}.")
    base = load_vocabulary(init)
    if vocab.itos[: len(base)] != base.itos:
        raise FineTuningError(f"the work dir's vocabulary does not extend {folder}'s: run training.prepare with "
                              f"--init-from {folder}.")
    config = replace(config, embedding_dim=init.config.embedding_dim, units=init.config.units)
    model = build_caption_model(config, embedding)
    for name, arrays in grown_weights(read_decoder_weights(init), embedding).items():
        model.get_layer(name).set_weights(arrays)
    return model, config


def grown_weights(weights: dict[str, list[np.ndarray]], embedding: np.ndarray) -> dict[str, list[np.ndarray]]:
    """A trained decoder's weights by layer name (weights.read_decoder_weights) -> the same for the grown vocabulary
    `embedding` describes (its first rows the old words'): the old rows and units as they were, the new words' input
    rows from `embedding` and their output units from their neighbours' (`new_output_units`)."""
    (old_embedding,) = weights["word_embedding"]
    kernel, bias = weights["next_word"]
    new_kernel, new_bias = new_output_units(kernel, bias, old_embedding, embedding[len(old_embedding):])
    return weights | {"word_embedding": [np.concatenate([old_embedding, embedding[len(old_embedding):]])],
                      "next_word": [np.concatenate([kernel, new_kernel], axis=1), np.concatenate([bias, new_bias])]}


