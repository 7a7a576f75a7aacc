"""Command line: caption image files.

    python -m captioner photo.jpg [more.jpg ...] [--method beam] [--beam-width 5] [--weights DIR | --repo ID] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from . import Captioner, InvalidImageError, WeightsError
from .decoding import DecodingOptions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioner", description="Caption images with the merge CNN-LSTM model.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--method", choices=["greedy", "beam"], default="greedy")
    parser.add_argument("--beam-width", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=None, help="most words to generate (default: the model's)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha for beam search")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="a local weights folder (default: $CAPTIONER_REPO, else the bundled weights/)")
    source.add_argument("--repo", help="a Hugging Face Hub model repo id")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) for --repo")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, with the candidates")
    args = parser.parse_args(argv)

    try:
        DecodingOptions(args.method, args.beam_width, args.max_length, args.length_penalty)  # fail before loading
        captioner = Captioner.from_pretrained(args.weights or args.repo, revision=args.revision)
    except (ValueError, WeightsError) as exc:
        parser.exit(2, f"error: {exc}\n")

    failures = 0
    for path in args.images:
        try:
            caption = captioner.caption(path, args.method, args.beam_width, args.max_length, args.length_penalty)
        except InvalidImageError as exc:
            failures += 1
            print(json.dumps({"image": path, "error": str(exc)}) if args.json else f"{path}: error: {exc}",
                  file=sys.stdout if args.json else sys.stderr)
            continue
        if args.json:
            candidates = [{"caption": text, "log_prob": round(lp, 4)} for text, lp in caption.candidates]
            print(json.dumps({"image": path, "caption": caption.text, "candidates": candidates}))
        else:
            print(f"{path}: {caption.text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
