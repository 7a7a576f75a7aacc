"""Reading the Flickr8k dataset folder (see ../shared/README.md for its layout and quirks)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "flickr8k"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def read_captions(data_dir: Path) -> dict[str, list[str]]:
    """image file name -> its captions, from Flickr8k.token.txt (`NAME.jpg#N<TAB>caption`).

    One image of the original file is listed as `NAME.jpg.1#N`: the `.1` is dropped.
    """
    captions: dict[str, list[str]] = defaultdict(list)
    with open(Path(data_dir) / "Flickr8k.token.txt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            key, caption = line.rstrip("\n").split("\t", 1)
            name = key.rsplit("#", 1)[0]
            if name.endswith(".jpg.1"):
                name = name[: -len(".1")]
            captions[name].append(caption.strip())
    return dict(captions)


def read_split(data_dir: Path, split: str) -> list[str]:
    """Image file names of an official split, in file order."""
    return (Path(data_dir) / SPLIT_FILES[split]).read_text().split()


def image_path(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / "images" / name
