"""What naming the objects and the familiarity flag do, on dev and on test (issue 23's tables).

    python -m benchmarks.visual [--weights weights] [--work-dir artifacts] [--coco-dev ../shared/coco-dev] [--json PATH]

Scores the app's decoding with and without name_objects (CIDEr, BLEU-4) on the Flickr8k dev and test splits (their
photos and captions as `python -m training.prepare` lists them in the work dir) and on coco-dev's photos, and the
flag of the recommended decoding's captions: the share of photos flagged and the mean per-image CIDEr of the
flagged and the unflagged ones. Features come from the folder's serving encoder, as the app computes them (cached
in <work-dir>/visual/). --weights may be an ensemble's folder (weights/ensemble-lite1, the page's default): each
member's features from its own serving encoder. Writes the figures to --json (default:
benchmarks/results/visual.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from captioner import DecodingOptions, Ensemble
from captioner.ensemble import load_model
from captioner.weights import BUNDLED_WEIGHTS
from training.evaluate import coco_scores
from training.visual import SHARED, per_image_cider, read_captions_tsv, served_features

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--coco-dev", type=Path, default=SHARED / "coco-dev")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "visual.json")
    args = parser.parse_args(argv)

    model = load_model(args.weights)  # a Captioner, or an Ensemble
    members = model.members if isinstance(model, Ensemble) else [model]
    dataset = json.loads((args.work_dir / "dataset.json").read_text())
    images, cache, sets = Path(dataset["dataset"]["images_folder"]), args.work_dir / "visual", {}

    def served(paths: list[Path], name: str):
        """The photos' features as the app computes them: each member's from its own serving encoder."""
        each = [served_features(member, paths, cache / (name if number == 0 else f"{name}_{member.config.encoder}"))
                for number, member in enumerate(members)]
        return each if isinstance(model, Ensemble) else each[0]

    for split in ("dev", "test"):
        names = [name for name in dataset["splits"][split] if (images / name).is_file()]
        sets[f"flickr8k_{split}"] = (served([images / n for n in names], f"flickr8k_{split}"),
                                     names, {n: dataset["splits"][split][n] for n in names})
    references = read_captions_tsv(args.coco_dev / "captions.tsv")
    names = sorted(references)
    sets["coco_dev"] = (served([args.coco_dev / "images" / n for n in names], "coco_dev"), names, references)

    recommended = DecodingOptions()
    report = {"weights": str(args.weights), "recommended_decoding": {k: v for k, v in vars(recommended).items()}}
    for name, (features, names, references) in sets.items():
        row = {}
        for label, naming in (("plain", False), ("name_objects", True)):
            captions = model.caption_features(features, name_objects=naming)
            hypotheses = {n: c.text for n, c in zip(names, captions)}
            scores = coco_scores(references, hypotheses)
            row[label] = {"CIDEr": round(scores["CIDEr"], 4), "BLEU-4": round(scores["BLEU-4"], 4)}
            if naming == recommended.name_objects:
                familiar = np.array([c.familiar for c in captions])
                per_image = per_image_cider(references, hypotheses, names)
                row["flag"] = {"photos": len(names), "flagged": round(float((~familiar).mean()), 3),
                               "flagged_cider": round(float(per_image[~familiar].mean()), 3) if (~familiar).any() else None,
                               "unflagged_cider": round(float(per_image[familiar].mean()), 3)}
        report[name] = row
        flag = row["flag"]
        print(f"{name} ({len(names)} photos): CIDEr plain {row['plain']['CIDEr']:.3f} / named {row['name_objects']['CIDEr']:.3f}, "
              f"BLEU-4 {row['plain']['BLEU-4']:.3f} / {row['name_objects']['BLEU-4']:.3f}; flagged {flag['flagged']:.1%}, "
              f"per-image CIDEr flagged {flag['flagged_cider']} vs unflagged {flag['unflagged_cider']}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
