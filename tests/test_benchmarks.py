"""The benchmark scripts run end to end in tiny mode (no timing assertions), and the speed benchmark's
old-way baseline decodes exactly what the fast decoder does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import load, speed
from captioner.decoding import DecodingOptions
from captioner.weights import write_random_weights


def test_speed_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--weights", "--images", "--repeats", "--json", "--skip-resnet", "--skip-cold-start", "--old-images"):
        assert option in text


def test_speed_benchmark_tiny_run(tiny_weights, example_images, tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = speed.main([
        "--weights", str(tiny_weights), "--images", *map(str, example_images[:2]), "--repeats", "1", "--batch", "3",
        "--batch-repeats", "1", "--old-images", "1", "--skip-resnet", "--json", str(out),
    ])
    assert code == 0  # without --strict, failed targets don't fail the run
    printed = capsys.readouterr().out
    assert "Targets" in printed and "old way" in printed
    results = json.loads(out.read_text())
    assert set(results) >= {"meta", "encoder", "decoding", "caption", "batch", "old_way", "cold_start", "random_resnet50",
                            "targets", "all_pass"}
    assert set(results["decoding"]) == {"greedy", "beam3", "beam5", "beam10"}
    assert {"batch1_ms_per_image", "batch3_ms_per_image"} <= set(results["encoder"])
    assert {"encode", "greedy", "beam5"} <= set(results["caption"])
    assert {"p50_ms", "p95_ms", "vs_encode"} <= set(results["caption"]["greedy"])
    assert {"encode_images_per_s", "caption_batch_greedy_images_per_s", "greedy_vs_encode"} <= set(results["batch"])
    for method in ("greedy", "beam5"):
        old = results["old_way"][method]
        assert {"old_ms_per_caption", "ours_ms_per_caption", "speedup"} <= set(old)
        assert old["same_best_caption"] is True
    cold = results["cold_start"]
    assert cold["seconds"] > 0 and cold["peak_rss_mb"] >= cold["peak_rss_mb_first_caption"] > 0
    assert results["random_resnet50"] is None
    assert [t["status"] for t in results["targets"]] and all(t["status"] in ("PASS", "FAIL") for t in results["targets"])


def test_speed_benchmark_can_skip_the_slow_parts(tiny_weights, example_images, tmp_path):
    out = tmp_path / "speed.json"
    speed.main(["--weights", str(tiny_weights), "--images", str(example_images[0]), "--repeats", "1", "--batch", "2",
                "--batch-repeats", "1", "--old-images", "0", "--skip-resnet", "--skip-cold-start", "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["old_way"] is None and results["cold_start"] is None
    skipped = [t["name"] for t in results["targets"] if t["status"] == "SKIP"]
    assert len(skipped) == 4  # two old-way speedups, cold start, peak memory


def test_real_size_random_resnet_weights_folder(tmp_path):
    from captioner import Captioner

    folder = write_random_weights(tmp_path / "resnet", "resnet50")
    captioner = Captioner.from_pretrained(folder)
    assert (captioner.config.encoder, captioner.config.vocab_size, captioner.config.units) == ("resnet50", 1564, 256)
    features = np.random.default_rng(0).random((2, 2048)).astype("float32")
    assert all(c.text for c in captioner.caption_features(features, DecodingOptions("beam", 3)))


def test_load_benchmark_tiny_run(tiny_weights, example_images, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = load.main(["--weights", str(tiny_weights), "--requests", "20", "--clients", "4", "--timeout-s", "300",
                      "--images", *map(str, example_images[:3]), "--json", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert code == 0, printed
    assert set(results) >= {"meta", "requests", "throughput_rps", "latency", "memory", "consistency", "checks", "all_pass"}
    assert results["requests"]["failed"] == results["requests"]["failed_warmup"] == 0
    assert results["requests"]["completed"] == 20
    assert results["consistency"]["combos_answered"] == 9  # 3 images x greedy, beam 3, beam 5
    assert results["consistency"]["inconsistent"] == [] and results["consistency"]["mismatched_reference"] == []
    assert {"rss_before_mb", "rss_after_mb", "growth_mb"} <= set(results["memory"])
    assert {"p50_ms", "p95_ms"} <= set(results["latency"]["all"])
    assert results["all_pass"] is True


@pytest.fixture(scope="module")
def old_way_features(tiny_captioner, example_images):
    encoded = tiny_captioner.encode(example_images[:2])
    noise = np.random.default_rng(5).random((1, tiny_captioner.config.feature_dim)).astype("float32") * 3
    return np.concatenate([encoded, noise])


@pytest.mark.parametrize("method, beam_width", [("greedy", 1), ("beam", 3)])
def test_old_way_decodes_the_same_captions(tiny_captioner, old_way_features, method, beam_width):
    """The baseline (model.predict on the padded prefix, per word and per beam) and the NumPy step decoder with
    carried LSTM state must find the same captions from the same features.

    Both rank candidates by float log-probabilities computed in different ways (Keras softmax then log, vs a
    log-softmax of NumPy logits), so exact ties could break differently; the log-probabilities are compared
    with a tolerance, and the candidate lists, not only the best caption, turn out identical here.
    """
    cap = tiny_captioner
    old = speed.OldWayDecoder(cap.model, cap.vocab, cap.config.max_length - 1)
    ours = cap.caption_features(old_way_features, DecodingOptions(method, beam_width))
    for row, fast in zip(old_way_features, ours):
        reference = old.caption(row, method, beam_width)
        assert reference[0][0] == fast.text
        assert [text for text, _ in reference] == [text for text, _ in fast.candidates]
        np.testing.assert_allclose([lp for _, lp in reference], [lp for _, lp in fast.candidates], atol=1e-3)
    calls_per_caption = old.predict_calls / len(old_way_features)
    assert calls_per_caption >= 1 if method == "greedy" else calls_per_caption > beam_width  # per word, per beam
