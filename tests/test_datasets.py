"""Training on other captioned photos: the dataset readers (Karpathy's JSON, COCO's JSON, CSV/TSV, Flickr8k's files),
their errors, and fine-tuning a weights folder on a few photos, end to end.

The photos are ../shared/coco-dev's (COCO images with 5 captions each); the caption files are written here, in each
reader's format, from its captions.tsv.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from captioner.visual import OUTPUT_UNIT_NEIGHBOURS as NEIGHBOURS
from captioner.visual import new_output_units
from captioner.vocabulary import Vocabulary
from captioner.weights import read_folder
from tests.conftest import FLICKR8K, SHARED
from training import run_all
from training.datasets import DatasetError
from training.finetune import extended_vocabulary
from training.prepare import PrepareConfig, prepare

COCO_DEV = SHARED / "coco-dev"
needs_coco_dev = pytest.mark.skipif(not (COCO_DEV / "captions.tsv").is_file(), reason=f"no coco-dev photos at {COCO_DEV}")
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason=f"no Flickr8k data at {FLICKR8K}")


def coco_dev_captions(images: int) -> dict[str, list[str]]:
    """The first `images` photos of coco-dev's captions.tsv (in file order) -> their 5 captions."""
    captions: dict[str, list[str]] = {}
    for line in (COCO_DEV / "captions.tsv").read_text().splitlines():
        name, caption = line.split("\t")
        if name in captions or len(captions) < images:
            captions.setdefault(name, []).append(caption)
    return captions


def prepared(tmp_path: Path, kind: str, data: Path, *, images: Path = COCO_DEV / "images", **options) -> dict:
    return prepare(PrepareConfig(data, tmp_path / "work", dataset=kind, images=images, **options))


# ---- Flickr8k: today's numbers, exactly -----------------------------------------------------------------

# sha256 of dataset.json as prepare wrote it before the readers existed (`--limit 80`; less the count of words no
# caption ends on, added since), and of the full vocabulary: the bundled model's vocab.json (its words as they were
# trained, 182cab7e... before the words no caption ends on were added to it).
FLICKR8K_LIMIT_80_DATASET_SHA256 = "60209aa0bacc6b756176c373ccf6d3812bfde7270d8370e0c0dc5e10b0807b4c"
FLICKR8K_VOCAB_SHA256 = "dcf211e4e77f9fa8e8891880745f877ec663ebc93bc56d3df4eccdd660515c00"


@needs_flickr8k
def test_flickr8k_prepares_exactly_as_before(tmp_path):
    dataset = prepare(PrepareConfig(FLICKR8K, tmp_path / "limited", limit=80))
    earlier_keys = ("splits", "missing_images", "limit", "vocabulary", "max_length")  # then "dataset" was added
    assert list(dataset) == [*earlier_keys, "dataset"]
    earlier = {key: dataset[key] for key in earlier_keys}
    earlier["vocabulary"] = {key: value for key, value in dataset["vocabulary"].items() if key != "never_final"}
    content = json.dumps(earlier) + "\n"
    assert hashlib.sha256(content.encode()).hexdigest() == FLICKR8K_LIMIT_80_DATASET_SHA256
    assert dataset["dataset"]["name"] == "Flickr8k" and dataset["dataset"]["split_rule"] == "official splits"

    prepare(PrepareConfig(FLICKR8K, tmp_path / "full"))
    assert hashlib.sha256((tmp_path / "full" / "vocab.json").read_bytes()).hexdigest() == FLICKR8K_VOCAB_SHA256


# ---- the readers ------------------------------------------------------------------------------------------


@needs_coco_dev
def test_karpathy_json_restval_trains_val_is_dev_and_missing_files_are_counted(tmp_path):
    captions = coco_dev_captions(12)
    names = list(captions)
    splits = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
    entries = [{"filepath": "images", "filename": name, "split": split, "imgid": i,
                "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions[name]]}
               for i, (name, split) in enumerate(zip(names, splits))]
    entries[0]["sentences"] = [{"tokens": ["a", "photo", "of", "tokens"]}]  # older files: tokens only
    entries.append({"filepath": "images", "filename": "not-there.jpg", "split": "test", "sentences": [{"raw": "gone"}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))

    dataset = prepared(tmp_path, "karpathy", path, images=COCO_DEV, min_count=0)
    assert {split: len(images) for split, images in dataset["splits"].items()} == {"train": 8, "dev": 2, "test": 3}
    assert list(dataset["splits"]["dev"]) == [f"images/{name}" for name in names[8:10]]  # filepath/filename
    assert dataset["splits"]["train"][f"images/{names[1]}"] == captions[names[1]]  # the raw sentences
    assert dataset["splits"]["train"][f"images/{names[0]}"] == ["a photo of tokens"]
    assert dataset["missing_images"] == {"train": [], "dev": [], "test": ["images/not-there.jpg"]}
    assert dataset["dataset"]["name"] == "COCO"


@needs_coco_dev
def test_coco_captions_json_with_a_split_file_or_a_seeded_split(tmp_path, capsys):
    captions = coco_dev_captions(20)
    images = [{"id": 100 + i, "file_name": name, "height": 480, "width": 640} for i, name in enumerate(captions)]
    annotations = [{"id": 7 * i + k, "image_id": 100 + i, "caption": c}
                   for i, name in enumerate(captions) for k, c in enumerate(captions[name])]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))

    names = list(captions)
    split_file = tmp_path / "splits.txt"
    split_file.write_text("".join(f"{name} {split}\n" for name, split in zip(names, ["train"] * 14 + ["val"] * 3 + ["test"] * 2)))
    dataset = prepared(tmp_path / "by_file", "coco", path, split_file=split_file)
    assert [list(dataset["splits"][split]) for split in ("train", "dev", "test")] == [names[:14], names[14:17], names[17:19]]
    assert dataset["splits"]["test"][names[17]] == captions[names[17]]  # the 20th image is in no split: left out

    seeded = prepared(tmp_path / "seeded", "coco", path, dev_fraction=0.2, test_fraction=0.1, split_seed=3)
    assert [len(seeded["splits"][split]) for split in ("train", "dev", "test")] == [14, 4, 2]
    assert sorted(name for split in seeded["splits"].values() for name in split) == sorted(names)
    assert "seeded split (seed 3, dev 0.2, test 0.1)" in capsys.readouterr().out  # the sizes are printed with it
    again = prepared(tmp_path / "again", "coco", path, dev_fraction=0.2, test_fraction=0.1, split_seed=3)
    other_seed = prepared(tmp_path / "other", "coco", path, dev_fraction=0.2, test_fraction=0.1, split_seed=4)
    assert again["splits"] == seeded["splits"] != other_seed["splits"]


@needs_coco_dev
def test_csv_and_tsv_files_with_or_without_header_and_split_column(tmp_path):
    tsv = prepared(tmp_path / "tsv", "csv", COCO_DEV / "captions.tsv")  # coco-dev's own file: no header, no split
    assert [len(tsv["splits"][split]) for split in ("train", "dev", "test")] == [198, 25, 25]
    assert all(len(captions) == 5 for split in tsv["splits"].values() for captions in split.values())

    captions = coco_dev_captions(4)
    names = list(captions)
    rows = [("image", "caption", "split")] + [(name, c, split) for name, split in zip(names, ["train", "train", "val", "test"])
                                              for c in captions[name]]
    rows.append((names[0], 'a "quoted" caption, with a comma', "train"))
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    dataset = prepared(tmp_path / "csv", "csv", path, min_count=0)
    assert [list(dataset["splits"][split]) for split in ("train", "dev", "test")] == [names[:2], [names[2]], [names[3]]]
    assert dataset["splits"]["train"][names[0]][-1] == 'a "quoted" caption, with a comma'
    assert dataset["dataset"]["split_rule"] == "the split column of mine.csv"


@pytest.mark.parametrize("file_name, content, sentence", [
    ("mine.tsv", "a.jpg\ta dog\nb.jpg\nc.jpg\ta cat\n", "mine.tsv line 2: expected 2 fields (IMAGE<TAB>CAPTION"),
    ("mine.csv", "image,caption\na.jpg,a dog\nb.jpg,\n", "mine.csv line 3: expected an image name and a caption"),
    ("mine.csv", "a.jpg,a dog,train\nb.jpg,a cat\n", "mine.csv line 2: expected 3 fields (image,caption[,split], as on the first line), found 2"),
    ("mine.csv", "a.jpg,a dog,train\nb.jpg,a cat,holdout\n", "mine.csv line 2: the split should be one of train, restval, dev, val"),
    ("mine.csv", "a.jpg,a dog,train\na.jpg,a cat,test\n",
     "mine.csv line 2: the split should be one of train, restval, dev, val, validation, test, and a.jpg's earlier rows say train"),
    ("mine.csv", "image,caption,source\na.jpg,a dog,me\n", "mine.csv line 1: the header should name the columns image, caption"),
    ("dataset_flickr30k.json", '{"images": [\n{"filename": "a.jpg", "split": "train", "sentences": []},\n{"filename": "b.jpg"}]}',
     "dataset_flickr30k.json: images[1] should be an object"),
    ("dataset_flickr30k.json", '{"images": [{"filename": "a.jpg", "split": "train",\n "sentences": [{"raw": 3}]}]}',
     "images[0].sentences[0] should be an object with \"raw\" (text) or \"tokens\""),
    ("dataset_flickr30k.json", '{"images": [\n{"filename": "a.jpg",}\n]}', "dataset_flickr30k.json line 2: not valid JSON"),
    ("captions_val2014.json", '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}',
     "captions_val2014.json: annotations[0] should be an object with an \"image_id\" listed in \"images\""),
    ("captions_val2014.json", '{"annotations": []}', "captions_val2014.json should be a JSON object with a list \"images\""),
])
def test_a_file_in_the_wrong_format_gets_a_sentence_naming_the_line(tmp_path, file_name, content, sentence):
    path = tmp_path / file_name
    path.write_text(content)
    kind = "karpathy" if file_name.startswith("dataset_") else "coco" if file_name.startswith("captions_") else "csv"
    with pytest.raises(DatasetError) as error:
        prepared(tmp_path, kind, path, images=tmp_path)
    assert sentence in str(error.value)


def test_a_split_file_line_without_a_split_is_named(tmp_path):
    (tmp_path / "mine.csv").write_text("a.jpg,a dog\nb.jpg,a cat\n")
    (tmp_path / "splits.txt").write_text("a.jpg train\nb.jpg\n")
    with pytest.raises(DatasetError, match=r"splits.txt line 2: expected an image name and its split"):
        prepared(tmp_path, "csv", tmp_path / "mine.csv", images=tmp_path, split_file=tmp_path / "splits.txt")


# ---- fine-tuning ---------------------------------------------------------------------------------------------


def test_the_vocabulary_keeps_the_folders_ids_and_adds_the_new_frequent_words(tiny_weights):
    old = Vocabulary.load(tiny_weights / "vocab.json")
    captions = ["a giraffe eats leaves", "a giraffe and a zebra", "the zebra runs", "a giraffe", "one okapi"]
    vocab, added = extended_vocabulary(tiny_weights, captions, min_count=1)
    assert added == ["giraffe", "zebra"]  # seen more than once and new; most frequent first
    assert vocab.itos == [*old.itos, "giraffe", "zebra"]


def test_a_new_words_output_unit_starts_as_its_glove_neighbours_mean():
    rng = np.random.default_rng(0)
    animal, food = np.eye(50)[0], np.eye(50)[1]
    # Old words: the 4 special tokens (zero vectors), 5 animals, 5 foods, 1 word GloVe lacks (a zero vector).
    old_vectors = np.concatenate([np.zeros((4, 50)), animal + 0.1 * rng.normal(size=(5, 50)),
                                  food + 0.1 * rng.normal(size=(5, 50)), np.zeros((1, 50))]).astype(np.float32)
    kernel, bias = rng.normal(size=(8, 15)).astype(np.float32), rng.normal(size=15).astype(np.float32)
    new_vectors = np.stack([animal + 0.05 * rng.normal(size=50), np.zeros(50)]).astype(np.float32)  # "giraffe", a word GloVe lacks

    columns, biases = new_output_units(kernel, bias, old_vectors, new_vectors)
    assert NEIGHBOURS == 5
    np.testing.assert_allclose(columns[:, 0], kernel[:, 4:9].mean(axis=1), rtol=1e-6)  # the five animals
    np.testing.assert_allclose(biases[0], bias[4:9].mean(), rtol=1e-6)
    np.testing.assert_allclose(columns[:, 1], kernel[:, 4:].mean(axis=1), rtol=1e-6)  # every old word, no special token
    np.testing.assert_allclose(biases[1], bias[4:].mean(), rtol=1e-6)


@needs_coco_dev
def test_fine_tuning_a_folder_on_a_few_photos_end_to_end(tiny_weights, tmp_path):
    """run_all on a TSV of 16 photos, one listed photo missing and one file that isn't an image: the tiny folder's
    network grows by the new words, trains from its weights, and is scored on the TSV's own test split."""
    images = tmp_path / "photos"
    images.mkdir()
    captions = coco_dev_captions(16)
    for name in captions:
        shutil.copy(COCO_DEV / "images" / name, images / name)
    (images / "broken.jpg").write_bytes(b"not a JPEG at all")
    captions |= {"broken.jpg": ["a broken file"], "gone.jpg": ["a photo nobody copied"]}
    (tmp_path / "captions.tsv").write_text("".join(f"{name}\t{c}\n" for name, caps in captions.items() for c in caps))
    work, out = tmp_path / "work", tmp_path / "weights"

    code = run_all.main(["--dataset", "csv", "--data", str(tmp_path / "captions.tsv"), "--images", str(images),
                         "--dev-fraction", "0.2", "--test-fraction", "0.25", "--init-from", str(tiny_weights),
                         "--random-encoder", "--min-count", "2", "--epochs", "1", "--batch-size", "16", "--scst-epochs", "0",
                         "--no-meteor", "--work-dir", str(work), "--out", str(out)])
    assert code == 0

    dataset = json.loads((work / "dataset.json").read_text())
    assert [name for names in dataset["missing_images"].values() for name in names] == ["gone.jpg"]
    split_of = {name: split for split, names in dataset["splits"].items() for name in names}
    features = work / "features" / "mobilenet_v2"
    assert json.loads((features / f"{split_of['broken.jpg']}.unreadable.json").read_text()) == ["broken.jpg"]
    rows = {split: json.loads((features / f"{split}.json").read_text()) for split in ("train", "dev", "test")}
    assert sorted(name for names in rows.values() for name in names) == sorted(set(captions) - {"broken.jpg", "gone.jpg"})

    tiny, tuned = read_folder(tiny_weights), read_folder(out)
    old_words, words = Vocabulary.load(tiny_weights / "vocab.json").itos, Vocabulary.load(out / "vocab.json").itos
    added = dataset["vocabulary"]["added_words"]
    assert len(added) > 20 and words == [*old_words, *added]
    assert tuned.config == replace(tiny.config, vocab_size=len(words), context_length=dataset["max_length"])  # more words
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["fine_tuned_from"] == str(tiny_weights) and training["words_added"] == len(added)
    assert training["dataset"] == "captions.tsv (seeded split (seed 0, dev 0.2, test 0.25))"

    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["split"], metrics["images"]) == ("captions.tsv", "test", len(rows["test"]))
    card = (out / "README.md").read_text()
    assert "Scores on the captions.tsv test split" in card and "captions-tsv" in card
    assert "before them the world of the model it was fine-tuned from" in card
