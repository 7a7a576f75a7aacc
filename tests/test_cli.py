"""The command line, run as a user would: `python -m captioner ...` in a new process."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_json_output_for_good_and_bad_files(tiny_weights, example_images, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    result = run_cli(example_images[0], bad, "--weights", tiny_weights, "--method", "beam", "--beam-width", "3", "--json")
    assert result.returncode == 1  # one file failed
    good, failed = (json.loads(line) for line in result.stdout.splitlines())
    assert good["image"] == str(example_images[0]) and good["caption"] == good["candidates"][0]["caption"]
    assert len(good["candidates"]) == 3
    assert [c["log_prob"] for c in good["candidates"]] == sorted((c["log_prob"] for c in good["candidates"]), reverse=True)
    assert failed["image"] == str(bad) and "not an image" in failed["error"]
    assert "Traceback" not in result.stderr


def test_plain_output_and_clear_usage_errors(tiny_weights, example_images, tmp_path):
    result = run_cli(example_images[0], "--weights", tiny_weights)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{example_images[0]}: ") and len(result.stdout.split(": ", 1)[1].strip()) > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(example_images[0], "--weights", empty)
    assert result.returncode == 2 and "No trained weights" in result.stderr and "Traceback" not in result.stderr

    result = run_cli(example_images[0], "--weights", tiny_weights, "--beam-width", "0", "--method", "beam")
    assert result.returncode == 2 and "Beam width must be between 1 and 10" in result.stderr

    result = run_cli(example_images[0], "--weights", tiny_weights, "--prefix", "a zebra")
    assert result.returncode == 2 and "doesn't know the word 'zebra'" in result.stderr


def test_the_prefix_starts_the_caption(tiny_weights, example_images):
    result = run_cli(example_images[0], "--weights", tiny_weights, "--prefix", "A dog", "--method", "greedy")
    assert result.returncode == 0 and result.stdout.startswith(f"{example_images[0]}: a dog")


def test_sampling_with_a_seed_repeats_its_captions(tiny_weights, example_images):
    sampling = ["--method", "sample", "--temperature", "2", "--top-p", "0.95", "--seed", "11", "--json"]
    first, again = (run_cli(*example_images[:3], "--weights", tiny_weights, *sampling) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and len(first.stdout.splitlines()) == 3
    result = run_cli(example_images[0], "--weights", tiny_weights, "--method", "sample", "--top-p", "0")
    assert result.returncode == 2 and "Top-p must be more than 0" in result.stderr and "Traceback" not in result.stderr


def test_explain_writes_each_words_heatmap(tiny_weights, example_images, tmp_path):
    out = tmp_path / "explained"
    result = run_cli(example_images[0], example_images[1], "--weights", tiny_weights, "--prefix", "a dog", "--explain", out, "--json")
    assert result.returncode == 0, result.stderr
    for line, image in zip(result.stdout.splitlines(), example_images[:2]):
        shown = json.loads(line)
        folder = out / image.stem
        assert shown["explanation"] == str(folder) and shown["caption"].startswith("a dog")
        written = json.loads((folder / "words.json").read_text())
        assert [w["word"] for w in written["words"]] == [w["word"] for w in shown["words"]] == shown["caption"].split()
        for number, word in enumerate(written["words"], start=1):
            assert word["overlay"] == f"{number:02d}_{word['word']}.jpg" and (folder / word["overlay"]).stat().st_size > 1000
            assert len(word["heatmap"]) == 7 and 0 < word["probability"] <= 1


def test_every_decoding_option_has_a_flag_that_sets_it():
    import argparse
    import dataclasses

    from captioner.cli import DECODING_FLAGS, add_decoding_arguments, decoding_options
    from captioner.decoding import DecodingOptions

    assert set(DECODING_FLAGS) == {field.name for field in dataclasses.fields(DecodingOptions)}
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    assert decoding_options(parser.parse_args([])) == DecodingOptions()
    given = decoding_options(parser.parse_args(["--repeat-words", "--no-name-objects", "--method", "greedy"]))
    assert given == DecodingOptions("greedy", name_objects=False, repeat_words=True)
