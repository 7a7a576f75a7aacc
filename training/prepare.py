"""Step 1: captions and splits -> dataset.json and the vocabulary.

    python -m training.prepare [--data ../shared/flickr8k] [--work-dir artifacts] [--min-count 10] [--limit N]
    python -m training.prepare --dataset karpathy --data dataset_flickr30k.json --images flickr30k-images/
    python -m training.prepare --dataset csv --data captions.csv --images photos/ [--split-file splits.txt]
    python -m training.prepare --dataset csv --data captions.csv --images photos/ --init-from weights   # fine-tuning

The readers are training.datasets'. dataset.json holds each split's images and their captions, the image files
that are missing (the features step skips them, counted), the vocabulary's size, the longest training caption, and
what the dataset is (its name, images folder and how it was split: the model card and metrics.json name it).
With --init-from, the vocabulary is the weights folder's, in its order, followed by the new training captions'
words seen more than --min-count times that it lacks (training.finetune).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from captioner.vocabulary import MIN_FINAL_SHARE, SPECIAL_TOKENS, Vocabulary, never_final_words, normalize_caption
from training.config import option, parse_config
from training.datasets import KINDS, SPLITS, DatasetError, SeededSplit, read_dataset
from training.flickr8k import DEFAULT_DATA_DIR

DEFAULT_WORK_DIR = Path("artifacts")


class WorkDirError(RuntimeError):
    """The work dir holds another run's files. One policy for every step: what a step finds in the work dir
    must have been made from the same inputs (then it is reused: that is how runs resume), or the step
    refuses, before writing anything, with this error's sentence."""


@dataclass(frozen=True)
class PrepareConfig:
    data: Path = option(DEFAULT_DATA_DIR, "the Flickr8k folder, or the caption file of --dataset karpathy, coco or csv")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes")
    min_count: int = option(10, "keep words seen more than this often in training captions")
    limit: int | None = option(None, "use only the first N images of each split (smoke runs)")
    dataset: str = option("flickr8k", "what --data is (see training/datasets.py)", choices=KINDS)
    images: Path | None = option(None, "the images folder (default: Flickr8k's images/, or the caption file's folder)")
    split_file: Path | None = option(None, "coco or csv files without splits: lines `IMAGE SPLIT` (default: a seeded split)")
    dev_fraction: float = option(SeededSplit.dev_fraction, "a seeded split's share of dev images")
    test_fraction: float = option(SeededSplit.test_fraction, "a seeded split's share of test images")
    split_seed: int = option(SeededSplit.seed, "a seeded split's seed")
    init_from: Path | None = option(None, "a weights folder to fine-tune: its vocabulary, then the new frequent words")


def prepare(config: PrepareConfig) -> dict:
    work_dir, min_count, limit = Path(config.work_dir), config.min_count, config.limit
    source = read_dataset(config.dataset, config.data, config.images, config.split_file,
                          SeededSplit(config.dev_fraction, config.test_fraction, config.split_seed))
    dataset = {"splits": {}, "missing_images": {}, "limit": limit}
    for split in SPLITS:
        names = list(source.splits[split])[:limit]
        dataset["splits"][split] = {name: source.splits[split][name] for name in names}
        dataset["missing_images"][split] = [name for name in names if not source.image_path(name).is_file()]

    train_captions = [c for caps in dataset["splits"]["train"].values() for c in caps]
    if not train_captions:
        raise DatasetError(f"{source.name} has no training captions: check --data, --dataset and the split rule.")
    lengths = [len(normalize_caption(c)) + 2 for c in train_captions]  # + <start>, <end>
    if config.init_from is None:
        vocab = Vocabulary.from_captions(train_captions, min_count=min_count)
        dataset["vocabulary"] = {"min_count": min_count, "words": len(vocab) - 4, "ids": len(vocab)}
    else:
        from training.finetune import extended_vocabulary

        vocab, added = extended_vocabulary(config.init_from, train_captions, min_count)
        dataset["vocabulary"] = {"min_count": min_count, "words": len(vocab) - 4, "ids": len(vocab),
                                 "extends": str(config.init_from), "added_words": added}
    # The words a caption may not end on, from how the training captions end (captioner/vocabulary.py).
    vocab = Vocabulary(vocab.itos[len(SPECIAL_TOKENS):], never_final_words(train_captions, vocab.itos[len(SPECIAL_TOKENS):]))
    dataset["vocabulary"]["never_final"] = len(vocab.never_final)
    dataset["max_length"] = max(lengths)
    dataset["dataset"] = {"kind": config.dataset, "source": str(Path(config.data).resolve())} | source.describe()

    earlier = json.loads((work_dir / "dataset.json").read_text()) if (work_dir / "dataset.json").is_file() else None
    if earlier and earlier["splits"] != dataset["splits"] and (work_dir / "features").is_dir():
        earlier_name = earlier.get("dataset", {}).get("name", "Flickr8k")  # work dirs of before the readers: Flickr8k
        images = lambda n: f"the first {n} images of each split" if n else "every image"  # noqa: E731
        held, wanted = images(earlier.get("limit")), images(limit)
        if earlier_name != source.name:
            held, wanted = f"{held} of {earlier_name}", f"{wanted} of {source.name}"
        raise WorkDirError(
            f"{work_dir} holds features of {held}, this run wants {wanted}. "
            "Use another --work-dir (e.g. artifacts-smoke for --limit runs), or delete that one to start afresh."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(work_dir / "vocab.json")
    (work_dir / "dataset.json").write_text(json.dumps(dataset) + "\n")
    report(dataset)
    return dataset


def report(dataset: dict) -> None:
    about = dataset["dataset"]
    print(f"{about['name']}, {about['split_rule']}; images in {about['images_folder']}")
    for split, images in dataset["splits"].items():
        print(f"{split}: {len(images)} images, {sum(map(len, images.values()))} captions, "
              f"{len(dataset['missing_images'][split])} image files missing")
    v = dataset["vocabulary"]
    if "extends" in v:
        added = v["added_words"]
        print(f"vocabulary: the {v['words'] - len(added)} words of {v['extends']} + {len(added)} new words seen more than "
              f"{v['min_count']} times{': ' + ', '.join(added[:30]) if added else ''}{' ...' if len(added) > 30 else ''}")
    else:
        print(f"vocabulary: {v['words']} words seen more than {v['min_count']} times + 4 special tokens = {v['ids']} ids")
    if "never_final" in v:
        print(f"{v['never_final']} words never end a caption (they end under {MIN_FINAL_SHARE:.0%} of the training captions "
              "they are in): decoding doesn't stop after them")
    print(f"max caption length: {dataset['max_length']} tokens (with <start> and <end>)")


def main(argv=None):
    prepare(parse_config(PrepareConfig, argv, __doc__))


if __name__ == "__main__":
    main()
