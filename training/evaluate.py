"""Step 5: caption the test split and score it as papers do.

    python -m training.evaluate [--weights weights] [--work-dir artifacts] [--split test]

Scores with the coco-caption toolkit (pycocoevalcap: BLEU-1..4, METEOR,
ROUGE-L, CIDEr; METEOR needs Java) for greedy decoding, beam widths 3 and 5,
and beam width 5 with a GNMT length penalty of 2, plus NLTK's corpus BLEU, the figure hobby versions of this model report.
Writes metrics.json beside the weights, metrics.md (a markdown table) and
captions_<split>.json (the best setting's captions, for inspection).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from captioner import Captioner, DecodingOptions
from captioner.vocabulary import normalize_caption
from training.features import load_features
from training.prepare import DEFAULT_WORK_DIR

SETTINGS = {
    "greedy": DecodingOptions("greedy"),
    "beam3": DecodingOptions("beam", beam_width=3, length_penalty=0.0),
    "beam5": DecodingOptions("beam", beam_width=5, length_penalty=0.0),
    # Chosen on the dev split (length penalty 0, 1, 1.5, 2, 3 with widths 3 and 5), never on test.
    "beam5_lp2": DecodingOptions("beam", beam_width=5, length_penalty=2.0),
}
COCO_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]


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
    from nltk.translate.bleu_score import corpus_bleu

    keys = list(references)
    refs = [[normalize_caption(r) for r in references[k]] for k in keys]
    hyps = [normalize_caption(hypotheses[k]) for k in keys]
    weights = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
    return {f"NLTK BLEU-{n + 1}": float(corpus_bleu(refs, hyps, weights=w)) for n, w in enumerate(weights)}


def evaluate(weights: Path, work_dir: Path, split: str = "test", settings: dict = SETTINGS, meteor: bool = True) -> dict:
    captioner = Captioner.from_pretrained(weights)
    dataset = json.loads((work_dir / "dataset.json").read_text())
    features, names = load_features(work_dir, captioner.config.encoder, split)
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
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in COCO_METRICS))
        hypotheses_by_setting[label] = hypotheses
    best = max(results, key=lambda k: results[k]["CIDEr"])
    (weights / f"captions_{split}.json").write_text(json.dumps({"decoding": best, "captions": hypotheses_by_setting[best]}, indent=0) + "\n")
    metrics = {"split": split, "images": len(names), "toolkit": "pycocoevalcap 1.2 (coco-caption)", "best": best, "results": results}
    (weights / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (weights / "metrics.md").write_text(markdown_table(metrics))
    return metrics


def markdown_table(metrics: dict) -> str:
    columns = [c for c in COCO_METRICS + ["NLTK BLEU-4"] if c in next(iter(metrics["results"].values()))]
    lines = [f"| decoding | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for label, scores in metrics["results"].items():
        mark = " (best)" if label == metrics["best"] else ""
        lines.append(f"| {label}{mark} | " + " | ".join(f"{scores[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--split", choices=["test", "dev"], default="test")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java)")
    args = parser.parse_args(argv)
    metrics = evaluate(args.weights, args.work_dir, args.split, meteor=not args.no_meteor)
    print(markdown_table(metrics))


if __name__ == "__main__":
    main()
