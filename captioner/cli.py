"""The command line, and the flags every entry point shares.

    captioner photo.jpg [more.jpg ...] [--method beam] [--beam-width 5] [--prefix "a dog"] [--weights DIR | --repo ID]
              [--method sample [--temperature 1] [--top-p 0.9] [--seed N]] [--json] [--explain OUT_DIR]
    (or python -m captioner ...)

`add_model_arguments` and `add_decoding_arguments` are the one definition of the model-choosing and
decoding flags: the app, this CLI and the batch job use them, and `decoding_options(args)` turns the
decoding flags into the one `DecodingOptions`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

DECODING_FLAGS = {  # DecodingOptions field -> its flag (the field's default is the flag's default)
    "method": "--method",
    "beam_width": "--beam-width",
    "max_new_tokens": "--max-new-tokens",
    "length_penalty": "--length-penalty",
    "prefix": "--prefix",
    "no_repeat_ngram_size": "--no-repeat-ngram-size",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "name_objects": "--name-objects",
    "repeat_words": "--repeat-words",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", help="a local weights folder, or an ensemble's folder (one with ensemble.json, like "
                        "weights/ensemble) (default: $CAPTIONER_REPO, else the bundled weights/)")
    source.add_argument("--repo", help="a Hugging Face Hub model repo id, e.g. user/image-captioner")
    parser.add_argument("--revision", help="with --repo: a branch, tag or commit")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.revision and not args.repo:
        parser.error("--revision needs --repo")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags; each defaults to None, which means DecodingOptions' own default."""
    from .decoding import METHODS, DecodingOptions

    defaults = DecodingOptions()
    group = parser.add_argument_group("decoding (defaults: the recommended decoding)")
    group.add_argument("--method", choices=METHODS, help=f"default: {defaults.method}")
    group.add_argument("--beam-width", type=int, help=f"beams kept by beam search (default: {defaults.beam_width})")
    group.add_argument("--max-new-tokens", type=int, help="most words to generate (default: the model's)")
    group.add_argument("--length-penalty", type=float, help=f"GNMT length penalty for beam search (default: {defaults.length_penalty:g})")
    group.add_argument("--prefix", help='words the caption must start with, e.g. "a dog"')
    group.add_argument("--no-repeat-ngram-size", type=int, help="forbid repeating any n-gram of this size (default: off)")
    group.add_argument("--repeat-words", action=argparse.BooleanOptionalAction,
                       help="let a word other than 'a', 'on', 'the' and the like appear twice in a caption "
                            f"(default: {'on' if defaults.repeat_words else 'off'})")
    group.add_argument("--temperature", type=float,
                       help=f"sampling: below 1 safer words, above 1 more varied ones (default: {defaults.temperature:g})")
    group.add_argument("--top-p", type=float,
                       help=f"sampling: draw among the likeliest words holding this much probability (default: {defaults.top_p:g})")
    group.add_argument("--seed", type=int, help="sampling: the same seed gives an image the same caption (default: a new draw each time)")
    group.add_argument("--name-objects", action=argparse.BooleanOptionalAction,
                       help="the caption names the objects the encoder's ImageNet classifier is sure of "
                            f"(default: {'on' if defaults.name_objects else 'off'})")


def decoding_options(args: argparse.Namespace):
    """The decoding flags given -> DecodingOptions (raises ValueError with a sentence for a bad value)."""
    from .decoding import DecodingOptions

    given = {field: getattr(args, field) for field in DECODING_FLAGS if getattr(args, field, None) is not None}
    return dataclasses.replace(DecodingOptions(), **given)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="captioner", description="Caption images with the merge CNN-LSTM model.")
    parser.add_argument("images", nargs="+", help="image files")
    add_decoding_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, with the candidates")
    parser.add_argument("--explain", metavar="DIR", help="also write where the model looked for each word: "
                        "DIR/<image>/NN_word.jpg (the photo with that word's heatmap) and words.json")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)

    from . import InvalidImageError, WeightsError, load_model
    from .batch import caption_record
    from .visual import unfamiliar_note
    from .decoding import limit_blas_threads
    from .explain import explanation_folder, save_overlays

    limit_blas_threads()
    try:
        options = decoding_options(args)  # fail before loading the model
        captioner = load_model(args.weights or args.repo, revision=args.revision)  # a Captioner, or an Ensemble
        options = captioner.decoding_options(options)  # the prefix's words, against this model's vocabulary
    except (ValueError, WeightsError) as exc:
        parser.exit(2, f"error: {exc}\n")

    failures, written = 0, set()
    for path in args.images:
        try:
            explanation = captioner.explain(path, options=options) if args.explain else None
            caption = explanation.caption if explanation else captioner.caption(path, options)
        except InvalidImageError as exc:
            failures += 1
            print(json.dumps({"image": path, "error": str(exc)}) if args.json else f"{path}: error: {exc}",
                  file=sys.stdout if args.json else sys.stderr)
            continue
        folder = save_overlays(explanation, explanation_folder(args.explain, path, written)) if explanation else None
        if args.json:
            line = caption_record(path, caption)
            if folder:
                line["explanation"] = str(folder)
                line["words"] = [{"word": w.word, "probability": round(w.probability, 4)} for w in explanation.words]
            print(json.dumps(line))
        else:
            print(f"{path}: {caption.text}" + (f"  (heatmaps in {folder})" if folder else ""))
            if caption.objects:
                print("  the classifier sees: " + ", ".join(f"{name} {probability:.0%}" for name, probability in caption.objects))
            if caption.familiar is False:
                print("  " + unfamiliar_note(caption.objects))
    return 1 if failures else 0
