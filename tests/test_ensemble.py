"""Ensembles (captioner/ensemble.py, model.EnsembleStepModel): a model with itself decodes exactly as alone, the
combination is the weighted mean of the members' log-probabilities renormalised, weights and vocabularies checked.
An ensemble's folder (ensemble.json) round trip and its errors; a decode worker's pixels for members of different
input sizes, the objects of the member with a classifier, the word-by-word view; the CLI, the batch job and
training.evaluate_ensemble with an ensemble's folder."""

import json
import shutil

import h5py
import numpy as np
import pytest

from captioner import Captioner, WeightsError, batch, load_model
from captioner.decoding import DecodingOptions
from captioner.ensemble import ENSEMBLE_FILE, Ensemble, read_ensemble_folder, write_ensemble_file
from captioner.image import prepare_pixels
from captioner.weights import HEAD_FILE, add_files
from tests.conftest import TINY_WORDS, make_weights_folder
from tests.test_cli import run_cli
from tests.test_decoding import allowed_log_probs
from training.random_weights import write_random_weights

SETTINGS = [DecodingOptions("greedy"), DecodingOptions("beam", beam_width=3, length_penalty=0.0), DecodingOptions()]


@pytest.fixture(scope="module")
def other_captioner(tmp_path_factory):
    """Another tiny model with the same words: another encoder (ResNet50's 2,048 features), 16 units, other weights."""
    folder = tmp_path_factory.mktemp("other_weights")
    return Captioner.from_pretrained(write_random_weights(folder, "resnet50", TINY_WORDS, units=16, context_length=12, seed=1))


def features_for(*captioners, images: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((images, c.config.feature_dim)).astype("float32") * 3 for c in captioners]


def assert_same_captions(ensemble_captions, single_captions):
    for ours, theirs in zip(ensemble_captions, single_captions, strict=True):
        assert ours.text == theirs.text
        assert [text for text, _ in ours.candidates] == [text for text, _ in theirs.candidates]
        np.testing.assert_allclose([p for _, p in ours.candidates], [p for _, p in theirs.candidates], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", SETTINGS, ids=["greedy", "beam3", "beam5_lp2"])
@pytest.mark.parametrize("images", [1, 4], ids=["one image", "batch"])
def test_a_model_with_itself_captions_exactly_as_alone(tiny_captioner, options, images):
    ensemble = Ensemble([tiny_captioner, tiny_captioner], weights=[0.5, 0.5])
    (features,) = features_for(tiny_captioner, images=images)
    assert_same_captions(ensemble.caption_features([features, features], options),
                         tiny_captioner.caption_features(features, options))


def test_a_model_with_itself_captions_a_photo_as_alone(tiny_captioner, example_images):
    ensemble = Ensemble.from_folders([tiny_captioner.weights.path, tiny_captioner.weights.path])
    assert ensemble.weights == (0.5, 0.5)
    assert_same_captions([ensemble.caption(example_images[0])], [tiny_captioner.caption(example_images[0])])
    assert_same_captions(ensemble.caption_batch(example_images[:3], method="greedy"),
                         tiny_captioner.caption_batch(example_images[:3], method="greedy"))


@pytest.mark.parametrize("options", SETTINGS[:2], ids=["greedy", "beam3"])
def test_a_member_of_weight_zero_changes_nothing(tiny_captioner, other_captioner, options):
    """Each member reads its own features and the weights say whose words count: all of them the first's here."""
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[1, 0])
    assert_same_captions(ensemble.caption_features(features, options), tiny_captioner.caption_features(features[0], options))
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[0, 2])
    assert_same_captions(ensemble.caption_features(features, options), other_captioner.caption_features(features[1], options))


def test_the_next_word_is_the_weighted_mean_of_the_members_log_probs_renormalised(tiny_captioner, other_captioner):
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner], weights=[1, 3])
    assert ensemble.weights == (0.25, 0.75)
    tokens = np.array([tiny_captioner.vocab.stoi[w] for w in ("a", "dog", "runs", "a")])
    expected = 0
    for captioner, member_features, weight in zip((tiny_captioner, other_captioner), features, ensemble.weights):
        model = captioner.step_model
        _, state = model.step(model.project_image(member_features), np.full(4, captioner.vocab.start_id), model.initial_state(4))
        logits, _ = model.step(model.project_image(member_features), tokens, state)
        expected = expected + weight * allowed_log_probs(logits, captioner.vocab, first=False)
    expected = allowed_log_probs(expected, tiny_captioner.vocab, first=False)

    model, task = ensemble.step_model, ensemble.decoding_task(method="greedy")
    image = model.project_image(np.concatenate(features, axis=1))
    _, state = model.step(image, np.full(4, tiny_captioner.vocab.start_id), model.initial_state(4))
    logits, _ = model.step(image, tokens, state)
    np.testing.assert_allclose(task._allowed_log_probs(logits, first=False), expected, atol=1e-5)


@pytest.mark.parametrize("weights, message", [
    ([1], "needs 2 weights, one per model, not 1"),
    ([1, 1, 1], "needs 2 weights, one per model, not 3"),
    ([1, -1], "numbers of at least 0"),
    ([1, float("nan")], "numbers of at least 0"),
    ([True, 1], "numbers of at least 0"),
    (["1", 1], "numbers of at least 0"),
    ([0, 0], "At least one of an ensemble's weights must be more than 0."),
])
def test_bad_weights_are_refused_with_a_sentence(tiny_captioner, weights, message):
    with pytest.raises(ValueError, match=message):
        Ensemble([tiny_captioner, tiny_captioner], weights=weights)


def test_models_with_different_vocabularies_are_refused(tiny_captioner, tmp_path):
    fewer = Captioner.from_pretrained(write_random_weights(tmp_path / "fewer", "mobilenet_v2", TINY_WORDS[:-1], units=32, context_length=12))
    with pytest.raises(ValueError, match=r"Model 2's vocabulary differs from model 1's \(18 tokens against 19\): .* share one vocabulary"):
        Ensemble([tiny_captioner, fewer])
    swapped = Captioner.from_pretrained(write_random_weights(tmp_path / "swapped", "mobilenet_v2", TINY_WORDS[1::-1] + TINY_WORDS[2:],
                                                             units=32, context_length=12))
    with pytest.raises(ValueError, match="token 4 is 'dog' there, 'a' in model 1"):
        Ensemble([tiny_captioner, swapped])
    with pytest.raises(ValueError, match="at least two models, not 1"):
        Ensemble([tiny_captioner])


def test_features_must_come_one_array_per_model(tiny_captioner, other_captioner):
    features = features_for(tiny_captioner, other_captioner)
    ensemble = Ensemble([tiny_captioner, other_captioner])
    with pytest.raises(ValueError, match="Expected 2 feature arrays, one per model"):
        ensemble.caption_features(features[:1])
    with pytest.raises(ValueError, match=r"Model 1 \(mobilenet_v2\) reads 1,280 features per image, not \(2048,\)"):
        ensemble.caption_features(features[::-1])


def test_the_ensemble_evaluation_takes_several_values_per_flag():
    from pathlib import Path

    from training.config import parse_config
    from training.evaluate_ensemble import EvaluateEnsembleConfig, weighting

    config = parse_config(EvaluateEnsembleConfig, ["--members", "weights", "weights/resnet50", "--work-dirs", "a", "b",
                                                   "--weightings", "0.5,0.5", "0.3,0.7"])
    assert config.members == (Path("weights"), Path("weights/resnet50")) and config.work_dirs == (Path("a"), Path("b"))
    assert config.weightings == ("0.5,0.5", "0.3,0.7") and config.split == "dev"
    assert weighting("0.3,0.7") == [0.3, 0.7]
    with pytest.raises(ValueError, match="numbers separated by commas, like 0.5,0.5, not '0.5;0.5'"):
        weighting("0.5;0.5")


# ---- an ensemble's folder ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def member_folders(tmp_path_factory):
    """Two tiny members side by side in models/: MobileNetV2 (224 x 224, no classifier) and EfficientNet-Lite1
    (240 x 240) with a tiny ImageNet classifier of five classes."""
    root = tmp_path_factory.mktemp("models")
    first = make_weights_folder(root / "first")
    second = write_random_weights(root / "second", "efficientnet_lite1", TINY_WORDS, units=16, context_length=12, seed=3)
    rng = np.random.default_rng(3)
    with h5py.File(root / HEAD_FILE, "w") as file:
        file["kernel"] = rng.normal(size=(1280, 5)).astype("float32")
        file["bias"] = np.zeros(5, "float32")
        file["class_names"] = np.array([b"golden_retriever", b"tabby", b"espresso", b"seashore", b"mountain_bike"])
    add_files(second, {HEAD_FILE: root / HEAD_FILE})
    return first, second


@pytest.fixture(scope="module")
def ensemble_folder(member_folders):
    folder = member_folders[0].parent / "ensembles" / "pair"
    write_ensemble_file(folder, member_folders, [3, 1], "a test's choice")
    return folder


@pytest.fixture(scope="module")
def pair(ensemble_folder) -> Ensemble:
    return Ensemble.from_folder(ensemble_folder)


def test_an_ensembles_folder_round_trip(member_folders, ensemble_folder, pair):
    assert json.loads((ensemble_folder / ENSEMBLE_FILE).read_text()) == {
        "format_version": 1, "members": ["../../first", "../../second"], "weights": [3.0, 1.0], "chosen_on": "a test's choice"}
    assert [m.weights.path.resolve() for m in pair.members] == [f.resolve() for f in member_folders]
    assert pair.weights == (0.75, 0.25) and pair.folder.chosen_on == "a test's choice"
    same = Ensemble([Captioner.from_pretrained(f) for f in member_folders], [3, 1])
    features = features_for(*pair.members)
    assert_same_captions(pair.caption_features(features), same.caption_features(features))
    assert pair.description["metrics"] is None  # no test scores written beside it
    (ensemble_folder / "metrics.json").write_text(json.dumps({"best": "beam5_lp2", "results": {"beam5_lp2": {"CIDEr": 0.5}}}))
    try:
        facts = Ensemble.from_folder(ensemble_folder).description
    finally:
        (ensemble_folder / "metrics.json").unlink()
    assert facts["metrics"]["results"]["beam5_lp2"]["CIDEr"] == 0.5 and facts["chosen_on"] == "a test's choice"
    assert facts["encoder"] == "mobilenet_v2 (0.75) + efficientnet_lite1 (0.25)" and facts["vocab_size"] == len(TINY_WORDS) + 4


def test_the_folders_move_together(member_folders, ensemble_folder, tmp_path):
    """The members are named relative to the ensemble's folder: a copy of the whole tree loads its own members."""
    copy = shutil.copytree(member_folders[0].parent, tmp_path / "copy")
    moved = Ensemble.from_folder(copy / "ensembles" / "pair")
    assert [m.weights.path.resolve() for m in moved.members] == [(copy / "first").resolve(), (copy / "second").resolve()]


def test_loaded_members_are_shared_not_loaded_again(member_folders, ensemble_folder, tiny_captioner):
    first = Captioner.from_pretrained(member_folders[0])
    ensemble = Ensemble.from_folder(ensemble_folder, members={str(member_folders[0]): first})
    assert ensemble.members[0] is first and ensemble.members[1] is not first
    with pytest.raises(ValueError, match="The model given for .*first was loaded from"):
        Ensemble.from_folder(ensemble_folder, members={member_folders[0]: tiny_captioner})


def write_file(folder, content) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ENSEMBLE_FILE).write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize("content, message", [
    (None, r"is not an ensemble's folder: it has no ensemble.json. Write one with `python -m training.evaluate_ensemble"),
    ('{"members": ["../first", ', r"ensemble.json can't be read as JSON \("),
    ([1, 2], "must hold a JSON object"),
    ({"format_version": 2, "members": ["../first", "../second"], "weights": [1, 1]}, "written by a newer version"),
    ({"members": ["../first"], "weights": [1]}, "must list at least two members' weights folders, as paths relative to"),
    ({"members": ["../first", "../second"], "weights": [1, 1, 1]},
     "gives 3 weights for its 2 members: one weight per member, in the members' order."),
    ({"members": ["../first", "../second"]}, "gives no list of weights for its 2 members"),
    ({"members": ["../first", "../second"], "weights": [1, -1]}, "numbers of at least 0"),
    ({"members": ["../first", "../third"], "weights": [1, 1]},
     r"The ensemble in .*pair is missing member 2: .*ensemble.json names '../third', and there is no folder .*third."),
])
def test_a_bad_ensemble_folder_is_refused_with_a_sentence(member_folders, tmp_path, content, message):
    root = tmp_path / "models"
    for folder in member_folders:
        shutil.copytree(folder, root / folder.name)
    (root / "pair").mkdir()
    if content is not None:
        write_file(root / "pair", content)
    with pytest.raises(WeightsError, match=message):
        Ensemble.from_folder(root / "pair")


def test_a_member_that_isnt_a_weights_folder_says_so(member_folders, tmp_path):
    (tmp_path / "empty").mkdir()
    write_file(tmp_path / "pair", {"members": [str(member_folders[0]), "../empty"], "weights": [1, 1]})
    with pytest.raises(WeightsError, match="No trained weights in .*empty"):
        Ensemble.from_folder(tmp_path / "pair")
    with pytest.raises(ValueError, match="needs 2 weights, one per model, not 1"):
        write_ensemble_file(tmp_path / "other", member_folders, [1], "")


# ---- a decode worker's pixels, objects, word by word --------------------------------------------------------


def test_pixels_for_members_of_different_input_sizes_caption_as_the_images(pair, example_images):
    """caption_pixels takes the pixels at the largest member's size, and each member gets them at its own: the
    captions are the ensemble's captions of the same images, each member reading them at its own size."""
    assert [m.input_size for m in pair.members] == [(224, 224), (240, 240)] and pair.input_size == (240, 240)
    pixels = np.stack([prepare_pixels(image, pair.input_size) for image in example_images[:3]])
    from_pixels = pair.caption_pixels(pixels, method="beam", beam_width=3)
    assert_same_captions(from_pixels, pair.caption_batch(list(pixels), method="beam", beam_width=3))
    assert [c.objects for c in from_pixels] == [c.objects for c in pair.caption_batch(list(pixels), method="beam", beam_width=3)]


def test_the_objects_and_the_flag_are_the_first_classifiers(pair, example_images):
    """(The tiny classifier's member has no flag: the captions have none. With the bundled members, the ensemble
    flags photos as Lite0 does: tests/test_visual.py.)"""
    seer = pair.members[1]
    assert pair.members[0].head is None and pair.seer == 1
    captions = pair.caption_batch(example_images[:3], method="greedy")
    assert [c.objects for c in captions] == [c.objects for c in seer.caption_batch(example_images[:3], method="greedy")]
    assert all(c.objects and c.objects[0][0] in {"golden retriever", "tabby", "espresso", "seashore", "mountain bike"}
               for c in captions)
    assert all(c.familiar is None and c.familiarity is None for c in captions)
    alone = Ensemble(pair.members[:1] * 2)
    assert alone.seer is None and alone.caption(example_images[0]).objects == []


def test_the_word_by_word_view_is_the_heaviest_members_of_the_ensembles_caption(pair, example_images):
    assert pair.explainer is pair.members[0] and pair.explained_by == "the ensemble's MobileNetV2 member"
    pixels = prepare_pixels(example_images[0], pair.input_size)
    explanation = pair.explain_pixels(pixels, options=DecodingOptions("beam", beam_width=3))
    caption = pair.caption_pixels(pixels[None], method="beam", beam_width=3)[0]
    assert explanation.caption == caption and [w.word for w in explanation.words] == caption.text.split()
    alone = pair.members[0].explain_pixels(prepare_pixels(example_images[0], (224, 224)), caption=caption.text)
    np.testing.assert_allclose([w.probability for w in explanation.words], [w.probability for w in alone.words], rtol=1e-5)
    heavier_second = Ensemble(pair.members, [1, 2])
    assert heavier_second.explained_by == "the ensemble's EfficientNet-Lite1 member"
    assert pair.explain(example_images[0], method="beam", beam_width=3).caption == caption


# ---- the CLI, the batch job and the evaluation ------------------------------------------------------------------


def test_the_cli_and_the_batch_job_caption_with_an_ensembles_folder(pair, ensemble_folder, example_images, tmp_path):
    assert isinstance(load_model(ensemble_folder), Ensemble) and isinstance(load_model(ensemble_folder / "../../first"), Captioner)
    expected = pair.caption_batch(example_images[:2], method="greedy")
    result = run_cli(*example_images[:2], "--weights", ensemble_folder, "--method", "greedy", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["caption"] for line in lines] == [c.text for c in expected]
    assert [line["objects"] for line in lines] == [[{"name": n, "probability": p} for n, p in c.objects] for c in expected]
    out = tmp_path / "captions.jsonl"
    assert batch.main([*map(str, example_images[:2]), "--out", str(out), "--weights", str(ensemble_folder),
                       "--method", "greedy", "--workers", "1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in records] == [c.text for c in expected]
    broken = tmp_path / "broken"
    write_file(broken, {"members": ["../first", "../second"], "weights": [1]})
    result = run_cli(example_images[0], "--weights", broken)
    assert result.returncode == 2 and "gives 1 weights for its 2 members" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's tokenizer needs Java")
def test_the_test_evaluation_makes_the_out_folder_an_ensembles(pair, member_folders, tmp_path):
    from training.evaluate_ensemble import DEV_REPORT, main

    names = ["a.jpg", "b.jpg", "c.jpg"]
    work_dirs = []
    for number, member in enumerate(pair.members):
        work_dir = tmp_path / f"work{number}"
        features = work_dir / "features" / member.config.encoder
        features.mkdir(parents=True)
        np.save(features / "test.npy", features_for(member, images=3)[0])
        (features / "test.json").write_text(json.dumps(names))
        (work_dir / "dataset.json").write_text(json.dumps({"dataset": {"name": "tiny"}, "splits": {
            "test": {name: ["a dog runs on the grass", "a cat is in the water"] for name in names}}}))
        work_dirs.append(work_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / DEV_REPORT).write_text(json.dumps({"images": 3, "decoding": "greedy", "best": "0.7,0.3", "results": {
        "0.5,0.5": {"CIDEr": 0.1}, "0.7,0.3": {"CIDEr": 0.2}}}))
    main(["--members", *map(str, member_folders), "--work-dirs", *map(str, work_dirs), "--split", "test",
          "--weightings", "0.7,0.3", "--out", str(out), "--no-meteor"])
    folder = read_ensemble_folder(out)
    assert [m.resolve() for m in folder.members] == [f.resolve() for f in member_folders] and folder.weights == (0.7, 0.3)
    assert folder.chosen_on == ("dev CIDEr on 3 images, decoded with greedy, weighting by weighting: 0.5,0.5 0.1000, "
                                "0.7,0.3 0.2000; 0.7,0.3 best (ensemble_dev.json)")
    assert Ensemble.from_folder(out).description["metrics"]["split"] == "test"
    main(["--members", *map(str, member_folders), "--work-dirs", *map(str, work_dirs), "--split", "test",
          "--weightings", "0.7,0.3", "--out", str(out), "--no-meteor", "--chosen-on", "by hand"])
    assert read_ensemble_folder(out).chosen_on == "by hand"


def test_the_explain_benchmark_times_an_ensemble_folder(ensemble_folder, example_images, tmp_path, capsys):
    """`python -m benchmarks.explain --weights weights/ensemble-lite1` times the page's default: the ensemble's caption,
    explained through a member."""
    from benchmarks import explain as benchmark

    out = tmp_path / "explain.json"
    assert benchmark.main(["--weights", str(ensemble_folder), "--images", str(example_images[0]), "--repeats", "1",
                           "--json", str(out)]) == 0
    assert str(ensemble_folder) in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["greedy"]["explain_p50_ms"] > 0 and results["greedy"]["plain_caption_p50_ms"] > 0
