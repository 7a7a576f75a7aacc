"""Ensembles scored: their weights chosen on the dev split, the chosen ensemble scored on test as evaluate does.

    python -m training.evaluate_ensemble --members weights artifacts/resnet50-scst \\
        --work-dirs artifacts/lite0 artifacts/resnet50 --split dev --weightings 0.5,0.5 0.3,0.7 0.7,0.3 --out artifacts/ensemble
    python -m training.evaluate_ensemble --members weights artifacts/resnet50-scst \\
        --work-dirs artifacts/lite0 artifacts/resnet50 --split test --weightings 0.5,0.5 --out artifacts/ensemble

Each member's features come from its own work dir (features/<its encoder>/, computed with exactly its encoder
weights: `python -m training.features --encoder E --work-dir W`, with --encoder-file for a folder that carries its
encoder); the images and references from the first's dataset.json. On dev every weighting is scored with the app's
default decoding (coco-caption without METEOR, and NLTK's BLEU) into <out>/ensemble_dev.json; on test the one
weighting given is scored with every decoding of training.evaluate into <out>/metrics.json and metrics.md, and <out>
becomes the ensemble's folder: <out>/ensemble.json names the members (relative to <out>), the weights, and how they
were chosen (--chosen-on, else the dev report <out>/ensemble_dev.json summed up), so that `Ensemble.from_folder(out)`
and `python -m captioner --weights <out>` load it. The bundled ensemble, weights/ensemble/, is made so (METEOR
needs Java; --no-meteor leaves it out):

    cp artifacts/ensemble-lite0-resnet50/ensemble_dev.json weights/ensemble/
    python -m training.evaluate_ensemble --members weights weights/resnet50 --work-dirs artifacts/lite0-bundled \\
        artifacts/resnet50 --split test --weightings 0.6,0.4 --out weights/ensemble
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from captioner import DecodingOptions
from captioner.ensemble import ENSEMBLE_FILE, Ensemble, write_ensemble_file
from training.config import option, parse_config
from training.evaluate import COCO_METRICS, NLTK_METRICS, coco_scores, nltk_bleu, score_settings
from training.features import load_features

DEFAULT_OUT = Path("artifacts/ensemble")
DEV_REPORT = "ensemble_dev.json"


@dataclass(frozen=True)
class EvaluateEnsembleConfig:
    members: tuple[Path, ...] = option((), "the members' weights folders")
    work_dirs: tuple[Path, ...] = option((), "each member's work dir, with its features of the split")
    weightings: tuple[str, ...] = option(("0.5,0.5",), "the members' weights, comma-separated, one weighting each "
                                                       "(test: exactly one)")
    split: str = option("dev", "dev: compare the weightings; test: score the one given", choices=["dev", "test"])
    out: Path = option(DEFAULT_OUT, "where the scores are written")
    no_meteor: bool = option(False, "test: skip METEOR (it needs Java)")
    chosen_on: str = option("", f"test: how the weights were chosen, in words, for {ENSEMBLE_FILE} "
                                f"(default: from <out>/{DEV_REPORT}, the dev comparison, if it is there)")


def weighting(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"A weighting is numbers separated by commas, like 0.5,0.5, not '{text}'.") from None


def member_features(ensemble: Ensemble, work_dirs: tuple[Path, ...], split: str) -> tuple[list, list[str]]:
    """Each member's features of the split from its work dir, and the images' names (the same rows in each)."""
    if len(work_dirs) != len(ensemble.members):
        raise ValueError(f"Give one work dir per member: {len(ensemble.members)} members, {len(work_dirs)} work dirs.")
    loaded = [load_features(work_dir, member.config.encoder, split) for member, work_dir in zip(ensemble.members, work_dirs)]
    names = loaded[0][1]
    for work_dir, (_, other_names) in zip(work_dirs[1:], loaded[1:]):
        if other_names != names:
            raise ValueError(f"{work_dir}'s {split} features are of other images than {work_dirs[0]}'s: "
                             "compute every member's features from the same dataset.json.")
    return [features for features, _ in loaded], names


def evaluate_ensemble(config: EvaluateEnsembleConfig) -> dict:
    weightings = [weighting(text) for text in config.weightings]
    if config.split == "test" and len(weightings) != 1:
        raise ValueError("Score one weighting on test, the one dev chose.")
    dataset = json.loads((Path(config.work_dirs[0]) / "dataset.json").read_text())
    ensemble = Ensemble.from_folders(config.members, weightings[0])
    features, names = member_features(ensemble, config.work_dirs, config.split)
    facts = {"ensemble": {"members": [str(m) for m in config.members], "weights": list(ensemble.weights)}}
    if config.split == "test":
        chosen_on = config.chosen_on or dev_summary(Path(config.out) / DEV_REPORT)  # read before the long scoring
        metrics = score_settings(ensemble, features, names, dataset, "test", Path(config.out), meteor=not config.no_meteor,
                                 facts=facts)
        write_ensemble_file(config.out, config.members, weightings[0], chosen_on)
        return metrics
    references = {name: dataset["splits"]["dev"][name] for name in names}
    results = {}
    for weights in weightings:
        ensemble = Ensemble(ensemble.members, weights)
        hypotheses = {name: c.text for name, c in zip(names, ensemble.caption_features(features, DecodingOptions()))}
        scores = coco_scores(references, hypotheses) | nltk_bleu(references, hypotheses)
        results[",".join(f"{w:g}" for w in ensemble.weights)] = scores
        print(f"weights {ensemble.weights}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in COCO_METRICS + NLTK_METRICS),
              flush=True)
    report = {"split": "dev", "images": len(names), "decoding": "the app's default (beam 5, length penalty 2)",
              "members": facts["ensemble"]["members"], "best": max(results, key=lambda k: results[k]["CIDEr"]), "results": results}
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / DEV_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def dev_summary(path: Path) -> str:
    """The dev report (DEV_REPORT) in a sentence, for ensemble.json's chosen_on: each weighting's dev CIDEr and the
    best. Without a report: a sentence saying that nothing records how the weights were chosen."""
    if not path.is_file():
        return f"not recorded (no --chosen-on, and no {DEV_REPORT} from a --split dev run beside it)"
    report = json.loads(path.read_text())
    scores = ", ".join(f"{weights} {scores['CIDEr']:.4f}" for weights, scores in report["results"].items())
    return (f"dev CIDEr on {report.get('images', '?')} images, decoded with {report.get('decoding', 'the default decoding')}, "
            f"weighting by weighting: {scores}; {report['best']} best ({DEV_REPORT})")


def main(argv=None):
    config = parse_config(EvaluateEnsembleConfig, argv, __doc__)
    report = evaluate_ensemble(config)
    if report["split"] == "test":
        print(f"best decoding on test: {report['best']}; {config.out} is the ensemble's folder ({ENSEMBLE_FILE})")
    else:
        print(f"best weighting on dev: {report['best']}")


if __name__ == "__main__":
    main()
