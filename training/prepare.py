"""Step 1: captions and splits -> dataset.json and the vocabulary.

    python -m training.prepare [--data ../shared/flickr8k] [--work-dir artifacts] [--min-count 10] [--limit N]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from captioner.vocabulary import Vocabulary, normalize_caption
from training.config import option, parse_config
from training.flickr8k import DEFAULT_DATA_DIR, image_path, read_captions, read_split

DEFAULT_WORK_DIR = Path("artifacts")


class WorkDirError(RuntimeError):
    """The work dir holds another run's files. One policy for every step: what a step finds in the work dir
    must have been made from the same inputs (then it is reused: that is how runs resume), or the step
    refuses, before writing anything, with this error's sentence."""


@dataclass(frozen=True)
class PrepareConfig:
    data: Path = option(DEFAULT_DATA_DIR, "the Flickr8k folder")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where every step writes")
    min_count: int = option(10, "keep words seen more than this often in training captions")
    limit: int | None = option(None, "use only the first N images of each split (smoke runs)")


def prepare(config: PrepareConfig) -> dict:
    data_dir, work_dir, min_count, limit = config.data, Path(config.work_dir), config.min_count, config.limit
    captions = read_captions(data_dir)
    dataset = {"splits": {}, "missing_images": {}, "limit": limit}
    for split in ("train", "dev", "test"):
        names = read_split(data_dir, split)[:limit]
        dataset["splits"][split] = {name: captions[name] for name in names if name in captions}
        dataset["missing_images"][split] = [name for name in names if not image_path(data_dir, name).is_file()]

    train_captions = [c for caps in dataset["splits"]["train"].values() for c in caps]
    vocab = Vocabulary.from_captions(train_captions, min_count=min_count)
    lengths = [len(normalize_caption(c)) + 2 for c in train_captions]  # + <start>, <end>
    dataset["vocabulary"] = {"min_count": min_count, "words": len(vocab) - 4, "ids": len(vocab)}
    dataset["max_length"] = max(lengths)

    earlier = json.loads((work_dir / "dataset.json").read_text()) if (work_dir / "dataset.json").is_file() else None
    if earlier and earlier["splits"] != dataset["splits"] and (work_dir / "features").is_dir():
        images = lambda n: f"the first {n} images of each split" if n else "every image"  # noqa: E731
        raise WorkDirError(
            f"{work_dir} holds features of {images(earlier.get('limit'))}, this run wants {images(limit)}. "
            "Use another --work-dir (e.g. artifacts-smoke for --limit runs), or delete that one to start afresh."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(work_dir / "vocab.json")
    (work_dir / "dataset.json").write_text(json.dumps(dataset) + "\n")
    return dataset


def main(argv=None):
    dataset = prepare(parse_config(PrepareConfig, argv, __doc__))
    for split, images in dataset["splits"].items():
        print(f"{split}: {len(images)} images, {sum(map(len, images.values()))} captions, "
              f"{len(dataset['missing_images'][split])} image files missing")
    v = dataset["vocabulary"]
    print(f"vocabulary: {v['words']} words seen more than {v['min_count']} times + 4 special tokens = {v['ids']} ids")
    print(f"max caption length: {dataset['max_length']} tokens (with <start> and <end>)")


if __name__ == "__main__":
    main()
