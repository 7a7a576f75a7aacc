"""The batch command: `python -m captioner.batch SRC... --out FILE`, on this machine and on a local Ray.

Every image gets exactly one record (its caption, or its error sentence), a rerun resumes, the three
output formats hold the same records, and Ray Data writes what the plain command writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import batch
from tests.conftest import ROOT

BAD_FILES = {  # name -> content: files that look like images by name and aren't
    "notes.jpg": b"not a photo",
    "empty.png": b"",
    "truncated.jpg": None,  # the first bytes of a real JPEG
    "page.webp": b"<html><body>hello</body></html>",
}


def make_collection(folder: Path, count: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """`count` small photos-to-be (JPEG and PNG, in nested folders) and the BAD_FILES among them."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(count):
        sub = folder / f"album{i % 3}" / ("nested" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((24, 32, 3)) * [255, 200, 150] * rng.random()).astype(np.uint8)
        path = sub / f"photo{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels).save(path)
        good.append(path)
    bad = []
    for name, content in BAD_FILES.items():
        path = folder / "album1" / name
        path.write_bytes(content if content is not None else good[1].read_bytes()[:200])
        bad.append(path)
    (folder / "album2" / "README.txt.md").write_text("not an image by its name: not listed")
    return good, bad


def read_records(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_image = {r["image"]: r for r in records}
    assert len(by_image) == len(records), "an image was recorded twice"
    return by_image


def run_batch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner.batch", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    good, bad = make_collection(folder, 24)
    return folder, good, bad


def test_sources_are_files_folders_globs_and_lists_of_paths(tmp_path):
    good, bad = make_collection(tmp_path / "photos", 6)
    listing = tmp_path / "photos" / "album0" / "some.txt"
    listing.write_text("photo000.png\n\n../album1/photo001.jpg\nmissing.jpg\n")
    in_folder = batch.list_images([str(tmp_path / "photos")])
    assert sorted(in_folder) == sorted(map(str, good + bad))  # recursive; by suffix; README.txt.md left out
    pngs = sorted(str(p) for p in good + bad if p.suffix == ".png" and p.parent.name != "nested")
    assert batch.list_images([str(tmp_path / "photos" / "album*" / "*.png")]) == pngs
    listed = [str(listing.parent / name) for name in ("photo000.png", "../album1/photo001.jpg", "missing.jpg")]
    assert batch.list_images([str(listing)]) == listed  # relative to the list; a missing file is kept (and recorded)
    twice = batch.list_images([str(good[0]), str(tmp_path / "photos")])
    assert twice[0] == str(good[0]) and len(twice) == len(in_folder)  # each image once, in the order given
    with pytest.raises(ValueError, match="not a file, a folder or a pattern"):
        batch.list_images([str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="No image files"):
        batch.list_images([str(tmp_path / "photos" / "*.gif")])


def test_a_folder_captioned_as_a_user_would(tiny_captioner, tiny_weights, collection, tmp_path):
    folder, good, bad = collection
    out = tmp_path / "captions.jsonl"
    result = run_batch(folder, "--out", out, "--weights", tiny_weights)
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stderr and f"{len(good)} captioned, {len(bad)} could not be read" in result.stderr
    records = read_records(out)
    assert set(records) == {str(p) for p in good + bad}
    for path in bad:
        assert set(records[str(path)]) == {"image", "error"} and records[str(path)]["error"].endswith(".")
    assert "not an image" in records[str(folder / "album1" / "notes.jpg")]["error"]
    assert "empty" in records[str(folder / "album1" / "empty.png")]["error"]
    # The captions another process wrote are the library's, decoded with the recommended settings.
    expected = tiny_captioner.caption_batch(good)
    for path, caption in zip(good, expected):
        record = records[str(path)]
        assert record["caption"] == caption.text
        assert [c["caption"] for c in record["candidates"]] == [text for text, _ in caption.candidates]
        np.testing.assert_allclose([c["log_prob"] for c in record["candidates"]], [lp for _, lp in caption.candidates], atol=1e-3)


def test_a_rerun_captions_only_what_is_missing(tiny_weights, collection, tmp_path, capsys):
    folder, good, bad = collection
    out = tmp_path / "captions.jsonl"
    assert batch.main([*map(str, good[:5]), "--out", str(out), "--weights", str(tiny_weights), "--method", "greedy"]) == 0
    first = out.read_text().splitlines()
    assert len(first) == 5
    with open(out, "a") as f:
        f.write('{"image": "' + str(good[5]) + '", "capt')  # the record a killed run was writing
    capsys.readouterr()
    assert batch.main([str(folder), "--out", str(out), "--weights", str(tiny_weights), "--method", "greedy"]) == 0
    assert "already holds 5 of the 28 images; captioning the other 23" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert lines[:5] == first  # kept as they were
    assert set(read_records(out)) == {str(p) for p in good + bad}  # the cut-off record redone, nothing twice
    assert batch.main([str(folder), "--out", str(out), "--weights", str(tiny_weights)]) == 0
    assert out.read_text().splitlines() == lines  # all done: nothing to add
    assert batch.main([str(good[0]), "--out", str(out), "--weights", str(tiny_weights), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_sampled_captions_with_a_seed_do_not_depend_on_the_batches(tiny_captioner, tiny_weights, collection, tmp_path):
    _, good, _ = collection
    sampling = ["--method", "sample", "--temperature", "2", "--top-p", "1", "--seed", "5"]
    for batch_size in (3, 32):
        out = tmp_path / f"batches_of_{batch_size}.jsonl"
        assert batch.main([*map(str, good[:10]), "--out", str(out), "--weights", str(tiny_weights), *sampling,
                           "--batch-size", str(batch_size)]) == 0
        records = read_records(out)
        # As the library samples each image, whatever the batch it came in (a resumed job, Ray's batches).
        expected = tiny_captioner.caption_batch(good[:10], method="sample", temperature=2, top_p=1, seed=5)
        assert [records[str(path)]["caption"] for path in good[:10]] == [c.text for c in expected]


def test_csv_and_parquet_hold_the_same_records(tiny_weights, collection, tmp_path):
    import pyarrow.parquet as pq

    folder, good, bad = collection
    common = [str(folder / "album1"), "--weights", str(tiny_weights), "--method", "greedy"]
    for suffix in ("jsonl", "csv", "parquet"):
        assert batch.main([*common, "--out", str(tmp_path / f"captions.{suffix}")]) == 0
    expected = read_records(tmp_path / "captions.jsonl")
    import csv

    with open(tmp_path / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = pq.read_table(tmp_path / "captions.parquet").to_pylist()
    assert not (tmp_path / "captions.parquet.partial.jsonl").exists()
    for row_set in (rows, table):
        assert [r["image"] for r in row_set] == list(expected)
        for r in row_set:
            want = expected[r["image"]]
            assert (r["caption"] or None) == want.get("caption") and (r["error"] or None) == want.get("error")
            candidates = json.loads(r["candidates"] or "[]") if isinstance(r["candidates"], str) else r["candidates"]
            assert candidates == want.get("candidates", [])


def test_parquet_resumes_from_the_journal_of_an_interrupted_run(tiny_weights, collection, tmp_path):
    import pyarrow.parquet as pq

    folder, good, _ = collection
    out = tmp_path / "captions.parquet"
    interrupted = batch.open_output(out)
    interrupted.write([batch.error_record(str(good[0]), "Stand-in record of the run that was killed.")])  # never closed
    assert batch.main([*map(str, good[:3]), "--out", str(out), "--weights", str(tiny_weights), "--method", "greedy"]) == 0
    records = {r["image"]: r for r in pq.read_table(out).to_pylist()}
    assert list(records) == [str(p) for p in good[:3]]
    assert records[str(good[0])]["error"] == "Stand-in record of the run that was killed."  # kept, not redone
    assert batch.main([*map(str, good[:4]), "--out", str(out), "--weights", str(tiny_weights), "--method", "greedy"]) == 0
    assert len(pq.read_table(out)) == 4


def test_bad_arguments_are_refused_with_a_sentence(tiny_weights, collection, tmp_path, capsys):
    folder, _, _ = collection
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("[1, 2, 3]\n")
    for out, extra, message in [
        (tmp_path / "captions.txt", [], "--out must end with .jsonl, .csv, .parquet"),
        (foreign, [], "is not a record of this command"),
        (tmp_path / "c.jsonl", ["--prefix", "a zebra"], "doesn't know the word 'zebra'"),
        (tmp_path / "c.jsonl", ["--beam-width", "11"], "Beam width must be between 1 and 10"),
        (tmp_path / "c.jsonl", ["--method", "sample", "--temperature", "5"], "Temperature must be between 0.1 and 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            batch.main([str(folder), "--out", str(out), "--weights", str(tiny_weights), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert foreign.read_text() == "[1, 2, 3]\n"  # left alone


def test_ray_data_writes_what_the_plain_command_writes(tiny_weights, tmp_path):
    """A local Ray (1 actor, 1 decode worker) over a few hundred images with bad files among them."""
    folder = tmp_path / "photos"
    good, bad = make_collection(folder, 300, seed=1)
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    assert batch.main([str(folder), "--out", str(plain), "--weights", str(tiny_weights), "--workers", "1"]) == 0
    result = run_batch(folder, "--out", on_ray, "--weights", tiny_weights, "--ray", "--ray-actors", "1", "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(good)} captioned, {len(bad)} could not be read" in result.stderr
    assert on_ray.read_text().splitlines() == plain.read_text().splitlines()  # the same records, in the same order
    assert len(read_records(on_ray)) == len(good) + len(bad)
