"""Step 9: what the encoder sees, for the app: the ImageNet classes' caption words and the familiarity flag.

    python -m training.visual --weights weights [--work-dir artifacts] [--coco-dev ../shared/coco-dev]

Needs the weights folder's ImageNet classifier (`python -m training.convert_encoder --head-into weights`) and the
work dir's features of the training and dev photos (training.features, with the folder's encoder). Writes
visual.json (the settings and the word map, readable) and visual.weights.h5 (the arrays) into the folder and lists
them in its config.json; the decoder and encoder files stay as they are. Every choice is made on dev photos: the
Flickr8k dev split, and with --coco-dev, photos unlike Flickr8k's (COCO: FILE<TAB>caption lines, 5 per photo).

The word map (captioner.visual.VisualWords): which caption word each ImageNet class stands for.
- Classes the training photos show (their probability summed over the training photos, the class's expected
  count, at least MIN_CLASS_PHOTOS): the word their captions use most with that class, if at least
  MIN_WORD_SHARE of them use it and MIN_LIFT times as often as captions in general (the dog breeds -> "dog",
  "football helmet" -> "football", "racket" -> "tennis"), or at least MIN_NAME_WORD_SHARE of them when that word is
  the class's own name ("umbrella", "mountain bike" -> "bike"); none if no word is that consistent ("torch" is what
  the classifier calls crowds at night: their captions never say torch).
- Classes they don't show: the class's general word where its name can't be one (GENERAL_WORDS: a tabby is a
  cat, an espresso is coffee), else the last word of its name ("Egyptian cat" -> "cat", "pizza"), if the vocabulary
  has it or it is among GloVe's MAX_NAME_RANK most frequent words.
  A word the vocabulary lacks is added for naming only, with its GloVe input row and its output unit transferred
  from its NEIGHBOURS nearest words (captioner.visual.new_output_units).
- A word also counts in its plural ("dog" or "dogs"), when the vocabulary has it.

The required probability (how sure the classifier must be of a word before the caption must say it) and the most
words one caption must name: the setting with the best sum of Flickr8k dev and coco-dev CIDEr (photos unlike
Flickr8k's count as much as its own; without --coco-dev, Flickr8k dev alone).

The familiarity flag (captioner.visual.Familiarity): the training features' mean, first PCA_DIMS principal axes and
the training photos projected on them (float16, unit length), the dev photos' scale of each part, the weights of
the caption's sureness and the classifier's confidence in its surest word (the best separation of right from wrong coco-dev
captions, see MIN_FLAGGED_UNLIKE) and the threshold that flags FLAGGED_SHARE of the Flickr8k dev photos, all with
the recommended decoding's captions. Beside the score, the word groups the classifier reliably sees (reliable_groups:
missed on at most MAX_MISSED of the training photos whose captions name them): a caption naming one where the
classifier gives it under ABSENT_PROBABILITY is flagged too.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from captioner import Captioner, DecodingOptions
from captioner.decoding import DecodingTask, Naming, mean_token_log_prob
from captioner.visual import Familiarity, VisualWords, new_output_units
from captioner.vocabulary import FUNCTION_WORDS, SPECIAL_TOKENS, normalize_caption
from captioner.weights import BUNDLED_WEIGHTS, VISUAL_SETTINGS_FILE, VISUAL_WEIGHTS_FILE, add_files, read_folder
from training.config import option, parse_config
from training.evaluate import coco_scores
from training.features import load_features
from training.glove import load_glove
from training.prepare import DEFAULT_WORK_DIR

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
# A class "the training photos show" once its probabilities over them add up to this many photos: below it, what
# their captions say with it is a handful of photos' accident ("Egyptian cat" -> "string").
MIN_CLASS_PHOTOS = 5.0
MIN_WORD_SHARE = 0.4  # of the class's captions (weighted by its probability) that use the word
# A word that is the class's own name ("umbrella", "bike" for "mountain bike", "ball" for "tennis ball") needs fewer of
# its captions: they and the classifier agree on what the thing is, even where many captions don't mention it. It
# named 11 more classes and moved the chosen setting's dev CIDEr from 0.507 to 0.511, coco-dev's from 0.400 to 0.410.
MIN_NAME_WORD_SHARE = 0.2
# How much more often than in all training captions: "man" goes with everything. At 3, "dog" (in a fifth of the
# captions) failed for a third of the breeds and colours named six of them; 2, 2.5 and 3 scored alike on dev
# (coco-dev CIDEr 0.400, 0.402, 0.402; Flickr8k dev 0.506, 0.506, 0.507).
MIN_LIFT = 2.5
# A class name's word rarer than this in GloVe's vocabulary (ordered by frequency) isn't what a caption would call
# the thing ("washbasin", "tusker", "airliner" is the 11,536th word, pizza the 9,388th, zebra the 28,959th):
# such classes name nothing. Measured on dev with names up to the 20,000th, 30,000th and 50,000th word (required
# probability 0.1, at most 2): coco-dev CIDEr 0.397, 0.407, 0.403; Flickr8k dev 0.522, 0.521, 0.516.
MAX_NAME_RANK = 30_000
# ImageNet-1k's general words that its class names don't give (its ids; the dog breeds, the domestic cats, espresso).
GENERAL_WORDS = {"dog": range(151, 269), "cat": range(281, 286), "coffee": range(967, 968)}
# The settings the required probability and the most words to name are chosen among.
REQUIRED_PROBABILITIES = (0.1, 0.15, 0.2, 0.3, 0.5)
MAX_REQUIRED = (1, 2)
PCA_DIMS = 128  # the training photos' summary: 6,000 x 128 float16 is 1.5 MB; 256 axes separated no better on dev
NEIGHBOURS = 5
# The weights of the caption's sureness and the classifier's confidence beside the nearness, compared on dev.
SURENESS_WEIGHTS = (0.0, 0.25, 0.5)
CONFIDENCE_WEIGHTS = (0.5, 1.0, 2.0)
# The flag may mark at most 10% of Flickr8k's test photos: the threshold flags 5% of the dev photos, because every
# weighting tried flagged 1.2 to 1.7 times as many test photos as dev ones (the test split is its own sample).
FLAGGED_SHARE = 0.05
# Among the weightings, the one whose flagged coco-dev captions score lowest against the unflagged ones, of those
# that flag at least this share of coco-dev's photos (about 25): the CIDEr of a handful says little.
MIN_FLAGGED_UNLIKE = 0.1
# A caption that names what the classifier reliably sees, where it gives it under ABSENT_PROBABILITY, is flagged
# (Familiarity.contradicted): "a brown and white dog" on an espresso. Reliably: of the training photos at least
# MIN_NAMING_CAPTIONS of whose captions name the group (at least MIN_RELIABLE_PHOTOS of them), it gives under
# ABSENT_PROBABILITY to at most MAX_MISSED. On the bundled model only "dog" is so seen (missed on 6 of 1,489 photos);
# "swing" was missed on 4.8% of 63, "bike" on 11% of 127, "ball" on 66%, "man" on 92%.
ABSENT_PROBABILITY = 0.01
MIN_NAMING_CAPTIONS = 3
MIN_RELIABLE_PHOTOS = 100
MAX_MISSED = 0.01


@dataclass(frozen=True)
class VisualConfig:
    weights: Path = option(BUNDLED_WEIGHTS, "the weights folder: its classifier reads the photos, the files go into it")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (dataset.json, the folder's encoder's features)")
    coco_dev: Path | None = option(SHARED / "coco-dev", "a folder of photos unlike Flickr8k's (images/, captions.tsv) to "
                                                         "choose on; none (or missing): Flickr8k dev only")
    report: Path | None = option(None, "also write every setting's dev figures here (JSON)")


# ---- the word map -------------------------------------------------------------------------------------------


def caption_word_shares(captions_by_photo: list[list[str]], vocab_words: list[str]) -> np.ndarray:
    """(photos, words): the share of each photo's captions that use each vocabulary word."""
    index = {word: i for i, word in enumerate(vocab_words)}
    shares = np.zeros((len(captions_by_photo), len(vocab_words)), np.float32)
    for photo, captions in enumerate(captions_by_photo):
        for caption in captions:
            for word in set(normalize_caption(caption)):
                if word in index:
                    shares[photo, index[word]] += 1.0 / len(captions)
    return shares


def name_word(class_id: int, name: str) -> str | None:
    """A class's word from its name alone: its general word, else the last word of its name ("Egyptian cat" -> cat)."""
    for word, ids in GENERAL_WORDS.items():
        if class_id in ids:
            return word
    words = re.split(r"[\s\-]+", name.strip().lower())
    return words[-1] if words and words[-1].isalpha() else None


def class_words(train_probabilities: np.ndarray, shares: np.ndarray, vocab_words: list[str], class_names: list[str],
                glove: dict) -> tuple[list[str | None], dict[int, dict]]:
    """-> (each class's word or None, why: {class: {"photos", "word", "share", "lift"}} for the classes the
    training photos show)."""
    photos = train_probabilities.sum(axis=0)
    given = (train_probabilities.T @ shares) / np.maximum(photos, 1e-12)[:, None]  # P(caption uses word | class)
    lift = given / np.maximum(shares.mean(axis=0), 1e-12)
    content = np.array([w not in FUNCTION_WORDS and w not in SPECIAL_TOKENS for w in vocab_words])
    rank = {word: i for i, word in enumerate(glove)}  # load_glove keeps GloVe's order: most frequent first
    words, why = [], {}
    for c, name in enumerate(class_names):
        if photos[c] >= MIN_CLASS_PHOTOS:
            eligible = content & (given[c] >= MIN_WORD_SHARE) & (lift[c] >= MIN_LIFT)
            # The word its captions use most among those consistent enough; else, for the record, the content word
            # they use most.
            best = int(np.argmax(np.where(eligible if eligible.any() else content, given[c], -1.0)))
            word = vocab_words[best] if eligible[best] else None
            own_name = name_word(c, name)
            if word is None and own_name and vocab_words[best] in (own_name, own_name + "s") \
                    and given[c, best] >= MIN_NAME_WORD_SHARE and lift[c, best] >= MIN_LIFT:  # captions and name agree
                word = vocab_words[best]
            why[c] = {"photos": round(float(photos[c]), 1), "word": word, "most_used": vocab_words[best],
                      "share": round(float(given[c, best]), 3), "lift": round(float(lift[c, best]), 1)}
        else:
            word = name_word(c, name)
            word = word if rank.get(word, MAX_NAME_RANK) < MAX_NAME_RANK or word in vocab_words else None
        words.append(word)
    return words, why


def word_groups(words: list[str | None], vocab_words: set[str]) -> tuple[list[list[str]], list[int], list[str]]:
    """Each class's word -> (the groups: each word with its plural when the vocabulary has it; each class's group,
    -1 for none; the words the vocabulary lacks, in order)."""
    groups, group_of, class_group, new_words = [], {}, [], []
    for word in words:
        if word is None:
            class_group.append(-1)
            continue
        if word not in group_of:
            group_of[word] = len(groups)
            groups.append([word, *([word + "s"] if word + "s" in vocab_words else [])])
            if word not in vocab_words:
                new_words.append(word)
        class_group.append(group_of[word])
    return groups, class_group, new_words


def visual_words(captioner: Captioner, train_probabilities: np.ndarray, train_captions: list[list[str]], glove: dict,
                 required_probability: float = 0.5, max_required: int = 1) -> tuple[VisualWords, dict]:
    """The folder's word map -> (VisualWords, its readable form for visual.json)."""
    vocab_words = captioner.vocab.itos
    shares = caption_word_shares(train_captions, vocab_words)
    words, why = class_words(train_probabilities, shares, vocab_words, list(captioner.head.class_names), glove)
    groups, class_group, new_words = word_groups(words, set(vocab_words))
    model = captioner.step_model
    old_vectors = np.stack([np.asarray(glove[w], np.float32) if w in glove and w not in SPECIAL_TOKENS
                            else np.zeros(50, np.float32) for w in vocab_words])
    new_vectors = np.stack([np.asarray(glove[w], np.float32) for w in new_words]) if new_words else np.zeros((0, 50), np.float32)
    kernel, bias = new_output_units(model.output_kernel, model.output_bias, old_vectors, new_vectors)
    ids = {word: i for i, word in enumerate([*vocab_words, *new_words])}
    result = VisualWords(tuple(tuple(ids[w] for w in group) for group in groups), np.array(class_group, np.int64),
                         tuple(new_words), new_vectors, kernel, bias, required_probability, max_required)
    readable = {"groups": groups, "class_group": class_group, "new_words": new_words,
                "required_probability": required_probability, "max_required": max_required,
                "classes_the_training_photos_show": {captioner.head.class_names[c]: v for c, v in why.items()}}
    return result, readable


# ---- the familiarity summary -------------------------------------------------------------------------------


def reliable_groups(train_group_probabilities: np.ndarray, train_captions: list[list[str]],
                    groups: list[list[str]]) -> tuple[list[int], dict]:
    """(photos, groups) the classifier's group probabilities on the training photos, and their captions -> (the groups
    it reliably sees, why: {the group's first word: {"photos": that name it, "missed": the share it doesn't see}})."""
    words = [[set(normalize_caption(caption)) for caption in captions] for captions in train_captions]
    chosen, why = [], {}
    for g, group in enumerate(groups):
        named = np.array([sum(not caption.isdisjoint(group) for caption in captions) >= MIN_NAMING_CAPTIONS
                          for captions in words])
        if named.sum() >= MIN_RELIABLE_PHOTOS:
            missed = float((train_group_probabilities[named, g] < ABSENT_PROBABILITY).mean())
            why[group[0]] = {"photos": int(named.sum()), "missed": round(missed, 4)}
            if missed <= MAX_MISSED:
                chosen.append(g)
    return chosen, why


def training_summary(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (mean, axes (feature_dim, PCA_DIMS), the training photos projected, unit length, float16)."""
    mean = train_features.mean(axis=0)
    _, _, vt = np.linalg.svd(train_features - mean, full_matrices=False)
    axes = vt[:PCA_DIMS].T.astype(np.float32)
    projected = (train_features - mean) @ axes
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    return mean.astype(np.float32), axes, projected.astype(np.float16)


def flagged_vs_unflagged(flagged: np.ndarray, per_image_cider: np.ndarray) -> float:
    """The flagged captions' mean per-image CIDEr over the unflagged ones' (lower: the flag separates better)."""
    if flagged.all() or not flagged.any():
        return 1.0
    return float(per_image_cider[flagged].mean() / max(per_image_cider[~flagged].mean(), 1e-12))


# ---- the step ----------------------------------------------------------------------------------------------


def dev_sets(config: VisualConfig, captioner: Captioner) -> dict[str, tuple[np.ndarray, list[str], dict[str, list[str]]]]:
    """{name: (features, photo names, references)}: the Flickr8k dev split, and coco-dev's photos when given, their
    features computed as the app computes them (the folder's serving encoder)."""
    work_dir = Path(config.work_dir)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    images = Path(dataset["dataset"]["images_folder"])
    names = [name for name in dataset["splits"]["dev"] if (images / name).is_file()]
    sets = {"flickr8k_dev": (served_features(captioner, [images / n for n in names], work_dir / "visual" / "flickr8k_dev"),
                             names, {n: dataset["splits"]["dev"][n] for n in names})}
    if config.coco_dev is not None and Path(config.coco_dev).is_dir():
        references = read_captions_tsv(Path(config.coco_dev) / "captions.tsv")
        names = sorted(references)
        sets["coco_dev"] = (served_features(captioner, [Path(config.coco_dev) / "images" / n for n in names],
                                            work_dir / "visual" / "coco_dev"), names, references)
    return sets


def served_features(captioner: Captioner, paths: list[Path], cache: Path) -> np.ndarray:
    """The photos' features from the folder's serving encoder (its OpenVINO model where it has one: what the app's
    captions and flags are computed from), cached as <cache>.npy under the encoder's and the photos' names."""
    files = json.loads((captioner.weights.path / "config.json").read_text())["files"] if captioner.weights else {}
    key = json.dumps([captioner.config.encoder, {name: digest for name, digest in files.items() if name.startswith("encoder.")},
                      [str(p) for p in paths]])
    if cache.with_suffix(".json").is_file() and cache.with_suffix(".json").read_text() == key:
        return np.load(cache.with_suffix(".npy"))
    features = captioner.encode(paths)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache.with_suffix(".npy"), features)
    cache.with_suffix(".json").write_text(key)
    return features


def read_captions_tsv(path: Path) -> dict[str, list[str]]:
    references = defaultdict(list)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, caption = line.split("\t", 1)
            references[name].append(caption)
    return dict(references)


def scored(captioner: Captioner, words: VisualWords | None, features, names, references) -> dict:
    """Captions with the recommended decoding, naming objects with `words` (None: plain) -> their CIDEr, BLEU-4,
    per-image CIDEr and mean log-probability per token."""
    naming = Naming.grown(captioner.step_model, captioner.vocab, words) if words else None
    task = DecodingTask(captioner.step_model, captioner.vocab, DecodingOptions(name_objects=naming is not None),
                        captioner.config.max_new_tokens, naming)
    found = task.run(features, class_probabilities=captioner.head.probabilities(features))
    hypotheses = {n: task.words.decode(h[0].tokens) for n, h in zip(names, found)}
    scores = coco_scores(references, hypotheses)
    return {"CIDEr": round(scores["CIDEr"], 4), "BLEU-4": round(scores["BLEU-4"], 4),
            "per_image": per_image_cider(references, hypotheses, names),
            "sureness": np.array([mean_token_log_prob(h[0]) for h in found]), "captions": hypotheses,
            "tokens": [h[0].tokens for h in found]}


def per_image_cider(references: dict[str, list[str]], hypotheses: dict[str, str], names: list[str]) -> np.ndarray:
    """Each photo's CIDEr (pycocoevalcap's, over these photos' references), in the order of `names`."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({n: [{"caption": c} for c in references[n]] for n in names})
    hyps = tokenizer.tokenize({n: [{"caption": hypotheses[n]}] for n in names})
    _, per_image = Cider().compute_score(refs, hyps)
    order = {name: index for index, name in enumerate(refs)}
    return np.asarray(per_image, np.float64)[[order[n] for n in names]]


def build(config: VisualConfig) -> dict:
    folder = read_folder(config.weights)
    # NumPy's exact step: decoder.onnx is made after the word map, from it (export_decoder), so every choice here is the
    # same whether or not the folder already has one (with the int8 step, required probabilities 0.15 and 0.2, which
    # tie to three decimals, swapped places).
    captioner = Captioner.from_folder(folder, decoder="float32")
    if captioner.head is None:
        raise SystemExit(f"error: {config.weights} has no ImageNet classifier: run `python -m training.convert_encoder "
                         f"--encoder {folder.config.encoder} --head-into {config.weights}` first")
    work_dir = Path(config.work_dir)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    train_features, train_names = load_features(work_dir, captioner.config.encoder, "train")
    train_probabilities = captioner.head.probabilities(train_features)
    glove = load_glove()
    train_captions = [dataset["splits"]["train"][n] for n in train_names]
    words, readable = visual_words(captioner, train_probabilities, train_captions, glove)
    print(f"word map: {sum(g >= 0 for g in readable['class_group'])} of {len(readable['class_group'])} classes name "
          f"{len(readable['groups'])} words, {len(words.new_words)} of them new ({', '.join(words.new_words[:12])}...)")

    sets = dev_sets(config, captioner)
    plain = {name: scored(captioner, None, *data) for name, data in sets.items()}
    report = {"plain": {name: {k: v for k, v in s.items() if k in ("CIDEr", "BLEU-4")} for name, s in plain.items()},
              "settings": {}}
    print("plain decoding: " + ", ".join(f"{name} CIDEr {s['CIDEr']:.3f}" for name, s in plain.items()), flush=True)
    results = {}
    for probability in REQUIRED_PROBABILITIES:
        for most in MAX_REQUIRED:
            setting = replace(words, required_probability=probability, max_required=most)
            results[(probability, most)] = {name: scored(captioner, setting, *data) for name, data in sets.items()}
            figures = {name: {k: v for k, v in result.items() if k in ("CIDEr", "BLEU-4")}
                       for name, result in results[(probability, most)].items()}
            report["settings"][f"p{probability:g}_max{most}"] = figures
            print(f"name_objects, required probability {probability:g}, at most {most}: " +
                  ", ".join(f"{name} CIDEr {f['CIDEr']:.3f}" for name, f in figures.items()), flush=True)
    # The best sum of the dev sets' CIDEr: photos unlike Flickr8k's count as much as Flickr8k's own.
    best = max(results, key=lambda key: sum(r["CIDEr"] for r in results[key].values()))
    words = replace(words, required_probability=best[0], max_required=best[1])
    readable.update(required_probability=best[0], max_required=best[1])
    named_default = sum(r["CIDEr"] for r in results[best].values()) > sum(r["CIDEr"] for r in plain.values())
    default_results = results[best] if named_default else plain
    print(f"chosen: required probability {best[0]:g}, at most {best[1]} (naming {'beats' if named_default else 'does not beat'} "
          f"plain decoding on dev)")

    mean, axes, training = training_summary(train_features)
    dev_features, dev = sets["flickr8k_dev"][0], default_results["flickr8k_dev"]
    reliable, reliability = reliable_groups(words.group_probabilities(train_probabilities), train_captions, readable["groups"])
    print(f"reliably seen: {', '.join(readable['groups'][g][0] for g in reliable) or 'nothing'} (missed on at most "
          f"{MAX_MISSED:.0%} of the training photos that show them)")
    summary = Familiarity(mean, axes, training.astype(np.float32), NEIGHBOURS, (0.0, 1.0), (0.0, 1.0), (0.0, 1.0), 0.0, 0.0, 0.0,
                          tuple(reliable), ABSENT_PROBABILITY)
    contradicted = {name: summary.contradicted(words, words.group_probabilities(captioner.head.probabilities(sets[name][0])),
                                               result["tokens"]) for name, result in default_results.items()}
    scale = lambda values: (float(np.mean(values)), float(np.std(values)))  # noqa: E731
    summary = replace(summary, nearness_scale=scale(summary.nearness(dev_features)), sureness_scale=scale(dev["sureness"]),
                      confidence_scale=scale(words.confidence(captioner.head.probabilities(dev_features))))
    separation = {}
    for sureness_weight in SURENESS_WEIGHTS:
        for confidence_weight in CONFIDENCE_WEIGHTS:
            candidate = replace(summary, sureness_weight=sureness_weight, confidence_weight=confidence_weight)
            score = lambda name: candidate.scores(sets[name][0], default_results[name]["sureness"],  # noqa: E731
                                                  words.confidence(captioner.head.probabilities(sets[name][0])))
            threshold = float(np.quantile(score("flickr8k_dev"), FLAGGED_SHARE))
            figures = {}
            for name, result in default_results.items():
                flagged = (score(name) < threshold) | contradicted[name]
                figures[name] = {"flagged": round(float(flagged.mean()), 3),
                                 "flagged_cider": round(float(result["per_image"][flagged].mean()), 3) if flagged.any() else None,
                                 "unflagged_cider": round(float(result["per_image"][~flagged].mean()), 3),
                                 "ratio": round(flagged_vs_unflagged(flagged, result["per_image"]), 3)}
            separation[sureness_weight, confidence_weight] = (threshold, figures)
            print(f"familiarity, sureness weight {sureness_weight:g}, confidence weight {confidence_weight:g}: " + "; ".join(
                f"{name} {f['flagged']:.0%} flagged, CIDEr {f['flagged_cider']} vs {f['unflagged_cider']}"
                for name, f in figures.items()), flush=True)
    judged_on = "coco_dev" if "coco_dev" in sets else "flickr8k_dev"
    useful = [key for key, (_, figures) in separation.items() if figures[judged_on]["flagged"] >= MIN_FLAGGED_UNLIKE] or list(separation)
    weights = min(useful, key=lambda key: separation[key][1][judged_on]["ratio"])
    threshold = separation[weights][0]
    familiarity = replace(summary, sureness_weight=weights[0], confidence_weight=weights[1], threshold=threshold)
    report["familiarity"] = {f"sureness_{a:g}_confidence_{b:g}": figures for (a, b), (_, figures) in separation.items()}

    settings = {
        "familiarity": {"neighbours": NEIGHBOURS, "pca_dims": PCA_DIMS, "nearness_scale": familiarity.nearness_scale,
                        "sureness_scale": familiarity.sureness_scale, "confidence_scale": familiarity.confidence_scale,
                        "sureness_weight": familiarity.sureness_weight, "confidence_weight": familiarity.confidence_weight,
                        "threshold": threshold, "flagged_share_of_dev": FLAGGED_SHARE,
                        "reliable_groups": reliable, "absent_probability": ABSENT_PROBABILITY, "reliably_seen": reliability,
                        "dev_figures": separation[weights][1]},
        "words": readable,
        "chosen_on": {**{name: report["plain"][name] | {"named": report["settings"][f"p{best[0]:g}_max{best[1]}"][name]}
                         for name in sets},
                      "name_objects_recommended": bool(named_default)},
    }
    work = work_dir / "visual"
    work.mkdir(parents=True, exist_ok=True)
    (work / VISUAL_SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    import h5py

    with h5py.File(work / VISUAL_WEIGHTS_FILE, "w") as file:
        file["familiarity/mean"], file["familiarity/axes"], file["familiarity/training"] = mean, axes, training
        file["words/new_embeddings"] = words.new_embeddings
        file["words/new_output_kernel"], file["words/new_output_bias"] = words.new_output_kernel, words.new_output_bias
    add_files(config.weights, {VISUAL_SETTINGS_FILE: work / VISUAL_SETTINGS_FILE, VISUAL_WEIGHTS_FILE: work / VISUAL_WEIGHTS_FILE})
    print(f"familiarity: sureness weight {weights[0]:g}, confidence weight {weights[1]:g}, threshold {threshold:.3f} -> "
          f"{config.weights}/{VISUAL_SETTINGS_FILE}, {VISUAL_WEIGHTS_FILE}")
    if config.report:
        Path(config.report).write_text(json.dumps(report, indent=1, default=lambda o: asdict(o)) + "\n")
    return report


def main(argv=None):
    build(parse_config(VisualConfig, argv, __doc__))


if __name__ == "__main__":
    main()
