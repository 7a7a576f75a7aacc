"""The Gradio demo: upload a photo, get a caption. UI only; all captioning logic lives in captioner/.

    python app.py [--share] [--host H] [--port P] [--weights DIR | --repo ID [--revision R]]

With no flags it loads what `Captioner.from_pretrained()` finds ($CAPTIONER_REPO, else the bundled
weights/), and Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself (Hugging Face Spaces sets
them). Without trained weights the page still opens and says how to get them.

Robustness notes:
* The caption event runs with `preprocess=False`, so our function receives Gradio's raw file payload.
  gr.Image's own preprocessing opens every upload with PIL (even with type="filepath") and a broken
  file then fails with a generic "the app raised an exception"; this way every file, broken or hostile,
  goes through `captioner.load_image`, whose messages say what is wrong.
* Gradio has no per-request time limit for ordinary (non-streaming) events; `time_limit` only applies to
  `.stream()`. Each request's cost is bounded instead: uploads up to MAX_FILE_BYTES (Gradio refuses larger
  ones), at most MAX_PIXELS decoded, beam width at most 10, max length at most the model's, and at most
  CONCURRENCY captions run at once with up to QUEUE_SIZE requests waiting.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import html
import logging
import math
import time
from pathlib import Path

import gradio as gr

from captioner import Captioner, WeightsError
from captioner.cli import add_model_arguments, check_model_arguments
from captioner.decoding import BEAM_WIDTHS, LENGTH_PENALTIES, DecodingOptions, limit_blas_threads
from captioner.image import IMAGE_SUFFIXES, MAX_FILE_BYTES

log = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"
CREDITS_FILE = EXAMPLES_DIR / "CREDITS.md"

CONCURRENCY = 2  # captions computed at once; more only slows each one down on a small CPU machine
QUEUE_SIZE = 64
# The page starts with the recommended decoding: DecodingOptions' defaults, which scored best on the dev split.
DEFAULTS = DecodingOptions()
BEAM_WIDTH_SLIDER = (2, BEAM_WIDTHS[1])  # beam search with width 1 is greedy decoding, the other choice
MIN_MAX_LENGTH = 2
FALLBACK_MAX_LENGTH = 30  # the max-length slider's range when no model is loaded

# The radio's choices are (label, value); the API also accepts the labels, in any case.
METHOD_CHOICES = [("Greedy", "greedy"), ("Beam search", "beam")]
METHODS = {name.lower(): value for label, value in METHOD_CHOICES for name in (label, value)}

CANDIDATE_HEADERS = ["rank", "caption", "log-probability", "probability"]
NOT_LOADED = "The captioning model isn't loaded."
GENERIC_ERROR = "Something went wrong while captioning this image. Please try again, or try another image."
FIX_WEIGHTS_HINT = (
    "To fix this, train the model with `python -m training.run_all` (it writes `weights/`), or set "
    "`CAPTIONER_REPO` to a Hugging Face Hub model repo, then restart the app."
)

# System fonts only: the default themes load Google Fonts, which hangs or fails where there's no internet.
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)
CSS = """
#caption textarea { font-size: 1.6rem; line-height: 1.35; font-weight: 600; }
#model-notice { border-left: 4px solid #d97706; padding: 0.5rem 1rem; background: rgba(217, 119, 6, 0.08); }
#facts { font-size: 0.9rem; opacity: 0.85; }
"""


class RequestError(ValueError):
    """A request the app can't serve; the message is for the user."""


# ---- pure helpers (no Gradio state) -----------------------------------------------------------


def decoding_options(method, beam_width, max_length, length_penalty) -> DecodingOptions:
    """The page's widgets (or an API call's values) -> the library's DecodingOptions, whose checks are the
    only ones. None means the default; greedy decoding ignores the beam width."""
    method = METHODS.get(str(method).strip().lower(), method) if method is not None else None
    given = {"method": method, "max_new_tokens": max_length, "length_penalty": length_penalty}
    if method == "beam":
        given["beam_width"] = beam_width
    return DecodingOptions(**{name: value for name, value in given.items() if value is not None})


def image_source(image) -> str | bytes | None:
    """What the caption function receives for the image -> a path or bytes for `load_image`.

    Normally Gradio's raw FileData dict (the event runs with preprocess=False), whose path Gradio has
    already checked lies in its upload cache; a plain path when an example gallery click runs the function
    through gr.Image's own preprocessing. Old clients may send the image inline as a data: URL.
    """
    if image is None or isinstance(image, str):
        return image or None
    if not isinstance(image, dict):
        raise RequestError("Expected an image file.")
    if image.get("path"):
        return image["path"]
    url = image.get("url") or ""
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.partition(",")[2], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("The image data sent is not valid base64.") from None
    return None


def candidate_rows(candidates: list[tuple[str, float]]) -> list[list]:
    """Beam candidates (best first) -> rows for the table: rank, caption, log-probability, probability."""
    return [
        [rank, text, round(log_prob, 3), float(f"{math.exp(log_prob):.3g}")]
        for rank, (text, log_prob) in enumerate(candidates, start=1)
    ]


def model_facts(description: dict, seconds: float | None = None) -> str:
    """One Markdown line about the loaded model (and how long the last caption took)."""
    source = description.get("source") or "unknown source"
    revision = description.get("revision")
    facts = [
        f"Encoder `{description['encoder']}`",
        f"weights from `{source}`" + (f" (revision `{revision[:10]}`)" if revision else ""),
        f"vocabulary of {description['vocab_size']:,} tokens",
    ]
    scores = score_summary(description.get("metrics"))
    if scores:
        facts.append(scores)
    if seconds is not None:
        facts.append(f"this caption took {seconds:.2f} s")
    return " · ".join(facts)


def score_summary(metrics: dict | None) -> str | None:
    """'test BLEU-4 0.213, CIDEr 0.541 (beam3)' from metrics.json's best setting, if it has one."""
    if not metrics:
        return None
    best = metrics.get("best")
    scores = (metrics.get("results") or {}).get(best) or {}
    shown = [f"{name} {scores[name]:.3f}" for name in ("BLEU-4", "CIDEr") if isinstance(scores.get(name), (int, float))]
    return f"test {', '.join(shown)} ({best})" if shown else None


def example_images() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def user_error(message: str) -> gr.Error:
    # gr.Error renders its message as HTML in the browser; file names and the like must show as text.
    return gr.Error(html.escape(message, quote=False), print_exception=False)


# ---- the demo ---------------------------------------------------------------------------------


def load_captioner(
    weights: str | None = None, repo: str | None = None, revision: str | None = None
) -> tuple[Captioner | None, str | None]:
    """(captioner, None), or (None, why not) when there are no usable weights."""
    try:
        captioner = Captioner.from_pretrained(weights or repo, revision=revision)
    except WeightsError as exc:
        log.error("No captioning model: %s", exc)
        return None, str(exc)
    captioner.warmup()
    return captioner, None


def build_demo(captioner: Captioner | None, unavailable_reason: str | None = None) -> gr.Blocks:
    """The Blocks app around `captioner`; with None, a page explaining `unavailable_reason`."""
    default_max_length = captioner.config.max_new_tokens if captioner else FALLBACK_MAX_LENGTH
    description = captioner.description if captioner else None
    static_facts = model_facts(description) if description else ""
    # Why there's no model and what to do. "No trained weights" errors already say how to get them;
    # the others (damaged files, the Hub unreachable) don't.
    unavailable = None
    if captioner is None:
        reason = unavailable_reason or "No weights were loaded."
        unavailable = reason if "training.run_all" in reason else f"{reason} {FIX_WEIGHTS_HINT}"

    def caption_image(image, method, beam_width, max_length, length_penalty):
        """Caption one image. method: 'greedy' or 'beam'. Returns the caption, the candidates table and facts."""
        try:
            if captioner is None:
                raise RequestError(f"{NOT_LOADED} {unavailable}")
            source = image_source(image)
            if source is None:
                raise RequestError("Please upload an image first (or pick one of the examples).")
            options = decoding_options(method, beam_width, max_length, length_penalty)
            start = time.perf_counter()
            result = captioner.caption(source, options)
            seconds = time.perf_counter() - start
        except ValueError as exc:  # InvalidImageError, RequestError and DecodingOptions' checks
            log.info("Rejected a request: %s", exc)
            raise user_error(str(exc)) from None
        except Exception:
            log.exception("Captioning failed")
            raise user_error(GENERIC_ERROR) from None
        log.info("%s caption in %.2f s: %s", options.method, seconds, result.text)
        return result.text, candidate_rows(result.candidates), model_facts(description, seconds)

    with gr.Blocks(title="Image captioner") as demo:
        gr.Markdown(
            "# Image captioner\n"
            "A CNN reads the photo and an LSTM writes a sentence about it: upload an image, or pick an example."
        )
        if captioner is None:
            gr.Markdown(f"**{NOT_LOADED}** {unavailable}", elem_id="model-notice")

        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Photo",
                    elem_id="photo",
                    sources=["upload", "webcam", "clipboard"],
                    type="filepath",  # used by example clicks only; uploads bypass Gradio's decoding (see above)
                    image_mode=None,  # keep the file as it is; load_image handles every mode
                    height=360,
                )
                method = gr.Radio(METHOD_CHOICES, value=DEFAULTS.method, label="Decoding")
                beam_width = gr.Slider(
                    *BEAM_WIDTH_SLIDER, value=DEFAULTS.beam_width, step=1, label="Beam width", visible=DEFAULTS.method == "beam",
                    info="How many partial captions beam search keeps at each step.",
                )
                with gr.Accordion("Advanced", open=False):
                    max_length = gr.Slider(
                        MIN_MAX_LENGTH, default_max_length, value=default_max_length, step=1, label="Max length",
                        info="At most this many words (the end-of-caption marker counts as one).",
                    )
                    length_penalty = gr.Slider(
                        *LENGTH_PENALTIES, value=DEFAULTS.length_penalty, step=0.1, label="Length penalty",
                        info="Beam search only: above 0 favours longer captions.",
                    )
                button = gr.Button("Caption this photo", variant="primary")

            with gr.Column(scale=1):
                caption = gr.Textbox(
                    label="Caption", elem_id="caption", lines=2, interactive=False, buttons=["copy"],
                    placeholder="The caption appears here.",
                )
                candidates = gr.Dataframe(
                    headers=CANDIDATE_HEADERS,
                    datatype=["number", "str", "number", "number"],
                    label="Beam candidates (best first)",
                    elem_id="candidates",
                    interactive=False,
                    wrap=True,
                    column_widths=["9%", "47%", "22%", "22%"],
                )
                facts = gr.Markdown(static_facts, elem_id="facts")

        inputs = [image, method, beam_width, max_length, length_penalty]
        outputs = [caption, candidates, facts]
        # No spinner or error badge on the one-line facts: it would cover the text.
        captioned = button.click(
            caption_image, inputs, outputs, api_name="caption", preprocess=False, show_progress_on=[caption, candidates]
        )
        # After an error, drop the last caption's time from the facts: it belongs to another image.
        captioned.failure(lambda: static_facts, None, facts, api_visibility="private", queue=False, show_progress="hidden")
        method.change(
            lambda chosen: gr.update(visible=chosen == "beam"), method, beam_width, api_visibility="private", queue=False
        )

        examples = example_images()
        if examples:
            # Only the image column has values, so a click sets the photo and keeps the user's settings.
            gr.Examples(
                [[path] for path in examples], inputs, outputs, fn=caption_image,
                run_on_click=True, cache_examples=False, examples_per_page=12, label="Examples (click one)",
            )

        if CREDITS_FILE.is_file():
            with gr.Accordion("Example image credits", open=False):
                gr.Markdown(CREDITS_FILE.read_text(encoding="utf-8"))
        gr.Markdown(
            "Example photos are public domain or CC0; see *Example image credits* above for their sources.",
            elem_id="credits-note",
        )

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the image-captioning demo.")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    # None lets Gradio use GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, then its own defaults.
    parser.add_argument("--host", default=None, help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    limit_blas_threads()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # our request log; libraries (httpx, ...) stay at WARNING
    demo = build_demo(*load_captioner(args.weights, args.repo, args.revision))
    demo.launch(
        share=args.share,
        server_name=args.host,
        server_port=args.port,
        theme=THEME,  # Gradio 6 takes theme and css in launch(), not in Blocks()
        css=CSS,
        max_file_size=MAX_FILE_BYTES,
    )


if __name__ == "__main__":
    main()
