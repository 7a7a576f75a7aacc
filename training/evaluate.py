"""Step 5: caption the dataset's test split and score it as papers do.

    python -m training.evaluate [--weights weights] [--work-dir artifacts] [--split test]
    python -m training.evaluate --weights W --split dev --sweep     # choose the decoding: many settings on dev

Scores with the coco-caption toolkit (pycocoevalcap: BLEU-1..4, METEOR,
ROUGE-L, CIDEr; METEOR needs Java) for greedy decoding, beam widths 3 and 5,
and beam width 5 with a GNMT length penalty of 2, plus NLTK's corpus BLEU, the figure hobby versions of this model report.
Writes metrics.json beside the weights (with the dataset's name and the split's size), metrics.md (a markdown
table) and captions_<split>.json (the best setting's captions, for inspection).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from captioner import Captioner, DecodingOptions
from captioner.vocabulary import normalize_caption
from captioner.weights import BUNDLED_WEIGHTS
from training.config import option, parse_config
from training.features import load_features
from training.prepare import DEFAULT_WORK_DIR

SETTINGS = {
    "greedy": DecodingOptions("greedy"),
    "beam3": DecodingOptions("beam", beam_width=3, length_penalty=0.0),
    "beam5": DecodingOptions("beam", beam_width=5, length_penalty=0.0),
    "beam5_lp2": DecodingOptions("beam", beam_width=5, length_penalty=2.0),
}
# The row metrics.json reports as "best", the model card's model-index and the app's model line show: the
# app's default decoding (DecodingOptions()), chosen on the dev split with --sweep, never on test.
RECOMMENDED_LABEL = next(label for label, options in SETTINGS.items() if options == DecodingOptions())
COCO_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
# NLTK's corpus BLEU, as the hobby versions of this model report it (a sibling project: BLEU-1 0.65, BLEU-2 0.40).
NLTK_METRICS = [f"NLTK BLEU-{n}" for n in range(1, 5)]


def coco_scores(references: dict[str, list[str]], hypotheses: dict[str, str], meteor=None) -> dict[str, float]:
    """coco-caption scores; both sides go through its PTB tokenizer, as in the official evaluation.

    meteor: a pycocoevalcap Meteor scorer to reuse (starting one loads Java for ~15 s), or None to skip METEOR.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    hyps = tokenizer.tokenize({k: [{"caption": hypotheses[k]}] for k in references})
    scores = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor is not None:
        scores["METEOR"] = float(meteor.compute_score(refs, hyps)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, hyps)[0])
    return scores


def nltk_bleu(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict[str, float]:
    """NLTK's corpus BLEU-1..4 on the normalised words, smoothed as the hobby versions report it (method 1: only an
    n-gram order without a single match would change, which never happens over a whole split)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    keys = list(references)
    refs = [[normalize_caption(r) for r in references[k]] for k in keys]
    hyps = [normalize_caption(hypotheses[k]) for k in keys]
    weights = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
    return {f"NLTK BLEU-{n + 1}": float(corpus_bleu(refs, hyps, weights=w, smoothing_function=SmoothingFunction().method1)) for n, w in enumerate(weights)}


@dataclass(frozen=True)
class EvaluateConfig:
    weights: Path = option(BUNDLED_WEIGHTS, "the weights folder to score (metrics.json is written beside it)")
    work_dir: Path = option(DEFAULT_WORK_DIR, "where the earlier steps wrote (dataset.json, features)")
    split: str = option("test", "the split to score", choices=["test", "dev"])
    no_meteor: bool = option(False, "skip METEOR (it needs Java)")
    sweep: bool = option(False, "compare many decoding settings (use --split dev) into decoding_<split>.json, not metrics.json")


def evaluate(config: EvaluateConfig, settings: dict = SETTINGS) -> dict:
    weights, work_dir, split = Path(config.weights), Path(config.work_dir), config.split
    captioner = Captioner.from_pretrained(weights)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    features, names = load_features(work_dir, captioner.config.encoder, split)
    return score_settings(captioner, features, names, dataset, split, weights, settings, meteor=not config.no_meteor)


def score_settings(captioner, features, names: list[str], dataset: dict, split: str, out: Path, settings: dict = SETTINGS,
                   meteor: bool = True, facts: dict | None = None) -> dict:
    """Caption `features` (the split's images `names`) with each decoding setting and score them; writes
    metrics.json (with `facts` added), metrics.md and captions_<split>.json to `out`.

    captioner: a Captioner and its features, or an ensemble (captioner.ensemble.Ensemble) and its members' features.
    """
    references = {name: dataset["splits"][split][name] for name in names}
    from pycocoevalcap.meteor.meteor import Meteor

    meteor_scorer = Meteor() if meteor else None  # one Java process for every setting
    results, hypotheses_by_setting = {}, {}
    for label, options in settings.items():
        started = time.time()
        captions = captioner.caption_features(features, options)
        seconds = time.time() - started
        hypotheses = {name: c.text for name, c in zip(names, captions)}
        scores = coco_scores(references, hypotheses, meteor_scorer) | nltk_bleu(references, hypotheses)
        scores["decode_seconds"] = round(seconds, 2)
        scores["distinct_captions"] = len(set(hypotheses.values()))
        results[label] = scores
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in COCO_METRICS + NLTK_METRICS))
        hypotheses_by_setting[label] = hypotheses
    best = RECOMMENDED_LABEL if RECOMMENDED_LABEL in results else max(results, key=lambda k: results[k]["CIDEr"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"captions_{split}.json").write_text(json.dumps({"decoding": best, "captions": hypotheses_by_setting[best]}, indent=0) + "\n")
    metrics = {"dataset": dataset["dataset"]["name"], "split": split,
               "images": len(names), "references_per_image": round(sum(map(len, references.values())) / len(names), 2),
               "toolkit": "pycocoevalcap 1.2 (coco-caption)", **(facts or {}), "best": best, "results": results}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "metrics.md").write_text(markdown_table(metrics))
    return metrics


def decoding_grid(beam_widths=(2, 3, 5), length_penalties=(0.0, 1.0, 2.0), no_repeat_ngram_sizes=(0, 3)) -> dict:
    """The settings --sweep compares: greedy and every beam width x length penalty, each with and without
    blocking repeated n-grams. Labels like "beam3_lp1" and "greedy_nr3"."""
    grid = {}
    for blocked in no_repeat_ngram_sizes:
        suffix = f"_nr{blocked}" if blocked else ""
        grid["greedy" + suffix] = DecodingOptions("greedy", no_repeat_ngram_size=blocked)
        for width in beam_widths:
            for alpha in length_penalties:
                grid[f"beam{width}_lp{alpha:g}{suffix}"] = DecodingOptions("beam", beam_width=width, length_penalty=alpha,
                                                                          no_repeat_ngram_size=blocked)
    return grid


def sweep(weights: Path, work_dir: Path, split: str = "dev", settings: dict | None = None) -> dict:
    """Score many decoding settings on `split` (dev: choose there, never on test); writes
    decoding_<split>.json and .md beside the weights, not metrics.json. METEOR is left out (Java start-up per run)."""
    captioner = Captioner.from_pretrained(weights)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    features, names = load_features(work_dir, captioner.config.encoder, split)
    references = {name: dataset["splits"][split][name] for name in names}
    results = {}
    for label, options in (settings or decoding_grid()).items():
        started = time.time()
        hypotheses = {name: c.text for name, c in zip(names, captioner.caption_features(features, options))}
        seconds = time.time() - started
        scores = coco_scores(references, hypotheses)
        scores["decode_seconds"] = round(seconds, 2)
        scores["distinct_captions"] = len(set(hypotheses.values()))
        scores["mean_words"] = round(sum(len(h.split()) for h in hypotheses.values()) / len(hypotheses), 2)
        scores["repeated_trigram"] = sum(_repeats_ngram(h.split(), 3) for h in hypotheses.values())
        results[label] = scores
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in COCO_METRICS), flush=True)
    best = max(results, key=lambda k: results[k]["CIDEr"])
    report = {"split": split, "images": len(names), "toolkit": "pycocoevalcap 1.2 (coco-caption)", "best": best, "results": results}
    (weights / f"decoding_{split}.json").write_text(json.dumps(report, indent=1) + "\n")
    (weights / f"decoding_{split}.md").write_text(markdown_table(report, extra=("mean_words", "repeated_trigram")))
    return report


def _repeats_ngram(words: list[str], n: int) -> bool:
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(ngrams) != len(set(ngrams))


def markdown_table(metrics: dict, extra: tuple[str, ...] = ()) -> str:
    columns = [c for c in COCO_METRICS + ["NLTK BLEU-1", "NLTK BLEU-4", *extra] if c in next(iter(metrics["results"].values()))]
    lines = [f"| decoding | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for label, scores in metrics["results"].items():
        mark = " (best)" if label == metrics["best"] else ""
        lines.append(f"| {label}{mark} | " + " | ".join(f"{scores[c]:.3f}" if isinstance(scores[c], float) else f"{scores[c]}"
                                                        for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    config = parse_config(EvaluateConfig, argv, __doc__)
    if config.sweep:
        report = sweep(config.weights, config.work_dir, config.split)
        print(markdown_table(report, extra=("mean_words", "repeated_trigram")))
        return
    print(markdown_table(evaluate(config)))


if __name__ == "__main__":
    main()
