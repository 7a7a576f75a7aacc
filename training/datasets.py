"""Captioned photos from any of the usual files, behind one interface: `read_dataset(kind, data, images, ...)`.

    flickr8k   Flickr8k's folder: Flickr8k.token.txt and the three official split lists (the default).
    karpathy   Karpathy's split file (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json): `images`,
               each with `filename` (and `filepath`, COCO's subfolder), `split` and `sentences` (`raw` or `tokens`).
    coco       COCO's own captions file (captions_train2014.json...): `images` (`id`, `file_name`) and
               `annotations` (`image_id`, `caption`). It has no splits: give a split file or take a seeded split.
    csv        a CSV or TSV file of `image,caption` rows (several rows per image), an optional third column
               `split`, an optional header row. Without a split column: a split file or a seeded split.

Every reader gives a CaptionDataset: the images folder, and for each split (train, dev, test) each image's captions,
the image named by its path under the folder. Splits are the pipeline's three: Karpathy's `val` is dev, his
`restval` (COCO's val2014 images outside val and test) is train. A file in the wrong format raises DatasetError
with a sentence that names the line (or the JSON entry) and what was expected.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from training import flickr8k

KINDS = ("flickr8k", "karpathy", "coco", "csv")
SPLITS = ("train", "dev", "test")
# Split names as datasets spell them -> the pipeline's.
SPLIT_NAMES = {"train": "train", "restval": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}
IMAGE_COLUMNS, CAPTION_COLUMNS = ("image", "file", "filename", "file_name", "path"), ("caption", "text", "sentence")


class DatasetError(ValueError):
    """A caption or split file can't be read; the message says where and what was expected."""


@dataclass(frozen=True)
class SeededSplit:
    """How a file without splits is cut: fractions of its images for dev and test, drawn with a seed."""

    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


@dataclass
class CaptionDataset:
    name: str  # for people: "Flickr8k", "COCO", "captions.csv"
    images: Path  # image names are paths under this folder
    splits: dict[str, dict[str, list[str]]]  # split -> image name -> its captions, in the file's order
    split_rule: str  # how the splits were made, for the model card: "official splits", "seeded split (seed 0, ...)"

    def image_path(self, name: str) -> Path:
        return self.images / name

    def describe(self) -> dict:
        """What dataset.json records about the dataset (the model card and metrics.json name it from here)."""
        return {"name": self.name, "images_folder": str(self.images.resolve()), "split_rule": self.split_rule}


def read_dataset(kind: str, data: Path, images: Path | None = None, split_file: Path | None = None,
                 seeded: SeededSplit = SeededSplit()) -> CaptionDataset:
    """kind: one of KINDS; data: Flickr8k's folder or the caption file; images: the images folder (default: Flickr8k's
    images/, or the caption file's folder); split_file: lines `IMAGE SPLIT`, for files without splits."""
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data} does not exist: give --data the {'Flickr8k folder' if kind == 'flickr8k' else 'caption file'}.")
    if kind == "flickr8k":
        return read_flickr8k(data, images)
    images = Path(images) if images is not None else data.parent
    if kind == "karpathy":
        return read_karpathy(data, images)
    captions, split_of = (read_coco_captions(data), None) if kind == "coco" else read_csv_captions(data)
    if split_of is not None:
        splits = {split: {name: caps for name, caps in captions.items() if split_of[name] == split} for split in SPLITS}
        rule = f"the split column of {data.name}"
    elif split_file is not None:
        splits, rule = split_by_file(captions, Path(split_file)), f"splits from {Path(split_file).name}"
    else:
        splits = split_seeded(captions, seeded)
        rule = f"seeded split (seed {seeded.seed}, dev {seeded.dev_fraction:g}, test {seeded.test_fraction:g})"
    return CaptionDataset(data.name, images, splits, rule)


# ---- the readers ---------------------------------------------------------------------------------------


def read_flickr8k(folder: Path, images: Path | None = None) -> CaptionDataset:
    """Flickr8k's own files, as this project has always read them (its numbers depend on it): each official split's
    images in file order, those with captions."""
    captions = flickr8k.read_captions(folder)
    splits = {split: {name: captions[name] for name in flickr8k.read_split(folder, split) if name in captions}
              for split in SPLITS}
    return CaptionDataset("Flickr8k", Path(images) if images else folder / "images", splits, "official splits")


def read_karpathy(path: Path, images: Path) -> CaptionDataset:
    """Karpathy's dataset_*.json: each image's `split` decides (restval -> train, val -> dev)."""
    content = _read_json(path)
    entries = _list_field(content, "images", path)
    splits: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for i, entry in enumerate(entries):
        where = f"{path.name}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not isinstance(entry.get("sentences"), list):
            raise DatasetError(f"{where} should be an object with a \"filename\" (text), a \"split\" and \"sentences\" "
                               f"(a list), as in Karpathy's dataset_*.json files; it is {_shown(entry)}.")
        split = SPLIT_NAMES.get(entry.get("split"))
        if split is None:
            raise DatasetError(f"{where} has split {entry.get('split')!r}; expected one of {', '.join(map(repr, SPLIT_NAMES))}.")
        name = str(Path(entry.get("filepath") or "") / entry["filename"])
        splits[split][name] = [_karpathy_sentence(sentence, f"{where}.sentences[{k}]")
                               for k, sentence in enumerate(entry["sentences"])]
    stem = path.stem.removeprefix("dataset_")
    name = {"flickr8k": "Flickr8k", "flickr30k": "Flickr30k", "coco": "COCO"}.get(stem, stem)
    return CaptionDataset(name, images, splits, f"Karpathy's splits from {path.name}, restval in train")


def read_coco_captions(path: Path) -> dict[str, list[str]]:
    """COCO's captions_*.json -> image file name -> its captions (images with none are left out)."""
    content = _read_json(path)
    files = {}
    for i, image in enumerate(_list_field(content, "images", path)):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise DatasetError(f"{path.name}: images[{i}] should be an object with an \"id\" and a \"file_name\", "
                               f"as in COCO's captions_*.json; it is {_shown(image)}.")
        files[image["id"]] = image["file_name"]
    captions: dict[str, list[str]] = defaultdict(list)
    for i, annotation in enumerate(_list_field(content, "annotations", path)):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str) \
                or annotation.get("image_id") not in files:
            raise DatasetError(f"{path.name}: annotations[{i}] should be an object with an \"image_id\" listed in "
                               f"\"images\" and a \"caption\" (text); it is {_shown(annotation)}.")
        captions[files[annotation["image_id"]]].append(annotation["caption"].strip())
    return dict(captions)


def read_csv_captions(path: Path) -> tuple[dict[str, list[str]], dict[str, str] | None]:
    """A .csv (commas, quoted fields) or .tsv/.txt (tabs, no quoting) of `image,caption[,split]` rows, with or
    without a header row -> (image -> its captions, image -> its split or None when the file has no split column)."""
    tab = path.suffix.lower() in (".tsv", ".tab", ".txt")
    expected = "IMAGE<TAB>CAPTION" if tab else "image,caption"
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tab else csv.reader(f)
        rows = [(reader.line_num, row) for row in reader]  # the line a row ends on: a quoted caption may span lines
    header = [cell.strip().lower() for cell in rows[0][1]] if rows else []
    has_header = bool(header) and header[0] in IMAGE_COLUMNS and len(header) > 1 and header[1] in CAPTION_COLUMNS
    if has_header and header[2:] not in ([], ["split"]):
        raise DatasetError(f"{path.name} line 1: the header should name the columns image, caption and optionally split; "
                           f"it names {', '.join(header)}.")
    columns = len(header) if has_header else None
    captions: dict[str, list[str]] = defaultdict(list)
    split_of: dict[str, str] = {}
    for line, row in rows[1:] if has_header else rows:
        if not any(cell.strip() for cell in row):
            continue
        columns = columns or len(row)  # the first row decides whether there is a split column
        if len(row) != columns or columns not in (2, 3):
            raise DatasetError(f"{path.name} line {line}: expected {columns if columns in (2, 3) else 2} fields "
                               f"({expected}{'[<TAB>SPLIT]' if tab else '[,split]'}, as on the first line), found "
                               f"{len(row)}: {_shown(row)}.")
        if not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{path.name} line {line}: expected an image name and a caption, found an empty one: {_shown(row)}.")
        name = row[0].strip()
        captions[name].append(row[1].strip())
        if columns == 3:
            split = SPLIT_NAMES.get(row[2].strip().lower())
            if split is None or split_of.setdefault(name, split) != split:
                raise DatasetError(f"{path.name} line {line}: the split should be one of {', '.join(SPLIT_NAMES)}"
                                   + (f", and {name}'s earlier rows say {split_of[name]}" if split else "")
                                   + f"; found {row[2]!r}.")
    return dict(captions), (split_of if columns == 3 else None)


# ---- splits for files without them ---------------------------------------------------------------------


def split_by_file(captions: dict[str, list[str]], split_file: Path) -> dict[str, dict[str, list[str]]]:
    """Lines `IMAGE SPLIT` (whitespace between): images listed in none are left out, a listed image without captions
    is an error."""
    split_file = Path(split_file)
    splits: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for line, text in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        fields = text.rsplit(None, 1)
        split = SPLIT_NAMES.get(fields[-1].lower()) if len(fields) == 2 else None
        if split is None:
            raise DatasetError(f"{split_file.name} line {line}: expected an image name and its split "
                               f"({', '.join(SPLIT_NAMES)}) separated by a space; found {text!r}.")
        if fields[0] not in captions:
            raise DatasetError(f"{split_file.name} line {line}: {fields[0]} has no captions in the caption file.")
        splits[split][fields[0]] = captions[fields[0]]
    return splits


def split_seeded(captions: dict[str, list[str]], seeded: SeededSplit) -> dict[str, dict[str, list[str]]]:
    """The images shuffled with the seed (from their sorted names: the same split whatever the file's order), then cut:
    round(n * test_fraction) for test, round(n * dev_fraction) for dev, the rest for train."""
    names = sorted(captions)
    random.Random(seeded.seed).shuffle(names)
    test, dev = round(len(names) * seeded.test_fraction), round(len(names) * seeded.dev_fraction)
    if test + dev >= len(names):
        raise DatasetError(f"{len(names)} images are too few for a dev fraction of {seeded.dev_fraction:g} and a test "
                           f"fraction of {seeded.test_fraction:g}: nothing would be left to train on.")
    cut = {"test": names[:test], "dev": names[test : test + dev], "train": names[test + dev :]}
    return {split: {name: captions[name] for name in sorted(cut[split])} for split in SPLITS}


# ---- helpers ---------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path.name} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}).") from None


def _list_field(content, field: str, path: Path) -> list:
    if not isinstance(content, dict) or not isinstance(content.get(field), list):
        raise DatasetError(f"{path.name} should be a JSON object with a list \"{field}\"; "
                           f"it has {', '.join(map(repr, content)) if isinstance(content, dict) else 'no object'} at the top.")
    return content[field]


def _karpathy_sentence(sentence, where: str) -> str:
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"].strip()
    if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        return " ".join(map(str, sentence["tokens"]))
    raise DatasetError(f"{where} should be an object with \"raw\" (text) or \"tokens\" (a list of words); it is {_shown(sentence)}.")


def _shown(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
