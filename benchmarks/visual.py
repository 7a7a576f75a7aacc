"""What naming the objects and the familiarity flag do, on dev and on test (issue 23's tables).

    python -m benchmarks.visual [--weights weights] [--work-dir artifacts] [--coco-dev ../shared/coco-dev] [--json PATH]

Scores the app's decoding with and without name_objects (CIDEr, BLEU-4) on the Flickr8k dev and test splits (their
photos and captions as `python -m training.prepare` lists them in the work dir) and on coco-dev's photos, and the
flag of the recommended decoding's captions: the share of photos flagged and the mean per-image CIDEr of the
flagged and the unflagged ones. Features come from the folder's serving encoder, as the app computes them (cached
in <work-dir>/visual/). Writes the figures to --json (default: benchmarks/results/visual.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from captioner import Captioner, DecodingOptions
from captioner.weights import BUNDLED_WEIGHTS
from training.visual import SHARED, read_captions_tsv, scored, served_features

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts"))
    parser.add_argument("--coco-dev", type=Path, default=SHARED / "coco-dev")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "visual.json")
    args = parser.parse_args(argv)

    captioner = Captioner.from_pretrained(args.weights)
    dataset = json.loads((args.work_dir / "dataset.json").read_text())
    images, cache, sets = Path(dataset["dataset"]["images_folder"]), args.work_dir / "visual", {}
    for split in ("dev", "test"):
        names = [name for name in dataset["splits"][split] if (images / name).is_file()]
        sets[f"flickr8k_{split}"] = (served_features(captioner, [images / n for n in names], cache / f"flickr8k_{split}"),
                                     names, {n: dataset["splits"][split][n] for n in names})
    references = read_captions_tsv(args.coco_dev / "captions.tsv")
    names = sorted(references)
    sets["coco_dev"] = (served_features(captioner, [args.coco_dev / "images" / n for n in names], cache / "coco_dev"),
                        names, references)

    recommended = DecodingOptions()
    report = {"recommended_decoding": {k: v for k, v in vars(recommended).items()}}
    for name, (features, names, references) in sets.items():
        row = {}
        for label, words in (("plain", None), ("name_objects", captioner.naming.visual_words)):
            result = scored(captioner, words, features, names, references)
            row[label] = {"CIDEr": result["CIDEr"], "BLEU-4": result["BLEU-4"]}
            if (label == "name_objects") == recommended.name_objects:
                familiar = np.array([c.familiar for c in captioner.caption_features(features)])
                per_image = result["per_image"]
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
