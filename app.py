"""The Gradio demo: upload a photo, get a caption. UI only; all captioning logic lives in captioner/.

    python app.py [--share] [--host H] [--port P] [--weights DIR | --repo ID [--revision R]]

With no flags it loads what `Captioner.from_pretrained()` finds ($CAPTIONER_REPO, else the bundled
weights/), and Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself (Hugging Face Spaces sets
them). Without trained weights the page still opens and says how to get them.

Robustness notes:
* The caption events run with `preprocess=False`, so our functions receive Gradio's raw payload, and
  `webapp.uploads` decides what they may read: only files uploaded to Gradio's cache, or an example
  the server lists, chosen by its index (the gallery sends nothing else). gr.Image's own preprocessing
  would open any path with PIL, in the server.
* Every image is decoded in a `captioner.sandbox` worker process with a deadline and a memory limit,
  so a crafted file costs one request, never the server. `middleware.RequestLimits` bounds every request
  before Gradio reads it (body size and pace, files per upload, the payload's shape).
* Each request's cost is bounded: at most CONCURRENCY captions run at once, with up to QUEUE_SIZE
  requests waiting; the queue is the only way in (`api_open=False`).
"""

from __future__ import annotations

import argparse
import html
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from captioner import Captioner, WeightsError
from captioner.cli import add_model_arguments, check_model_arguments
from captioner.decoding import BEAM_WIDTHS, LENGTH_PENALTIES, DecodingOptions, limit_blas_threads
from captioner.explain import OVERLAY_MAX_SIDE, Explanation, overlay
from captioner.image import IMAGE_SUFFIXES, MAX_FILE_BYTES
from webapp import middleware, uploads
from webapp.many_photos import caption_photos, write_csv, write_json
from webapp.uploads import RequestError

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

# score: what beam search ranks by, the log-probability divided by ((5 + length) / 6) ** length penalty.
CANDIDATE_HEADERS = ["#", "caption", "score", "log-prob", "probability"]
MAX_BATCH_FILES = 50  # photos per "Many photos" request: about 2-4 s of work here
# A batch of crafted files could keep the decode workers at their deadline file after file: the files not read
# within this time are listed as not captioned, with a sentence asking to send them again.
BATCH_TIME_LIMIT_S = 60.0
BATCH_HEADERS = ["file", "caption", "why it has no caption"]
BATCH_CONCURRENCY = 1  # batches at once, beside the single captions
GALLERY_MAX_SIDE = 512  # the "Many photos" gallery shows each photo at most this many pixels a side (50 of them: ~40 MB)
PHOTO_JPEG_QUALITY = 85  # the explained photo is kept per session as a small JPEG, for the word clicks
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
#words .textfield { font-size: 1.25rem; line-height: 2.2; }
/* gr.HighlightedText shades a score in red; turned to the theme's indigo. */
#words .token.highlighted { cursor: pointer; filter: hue-rotate(250deg); }
#heatmap img { object-fit: contain; }
#batch-summary { font-size: 1rem; }
/* The gallery keeps a 320 px box even for one row of photos; let it fit them, and scroll past 3 rows. */
#batch-gallery .grid-wrap { min-height: 0 !important; max-height: 560px; overflow-y: auto; }
"""


# ---- pure helpers (no Gradio state) -----------------------------------------------------------


def decoding_options(method, beam_width, max_length, length_penalty, prefix=None) -> DecodingOptions:
    """The page's widgets (or an API call's values) -> the library's DecodingOptions, whose checks are the
    only ones. None means the default; greedy decoding ignores the beam width. prefix: the words the
    caption must start with ("Start the caption with..."; "" or None: none)."""
    method = METHODS.get(str(method).strip().lower(), method) if method is not None else None
    given = {"method": method, "max_new_tokens": max_length, "length_penalty": length_penalty, "prefix": prefix}
    if method == "beam":
        given["beam_width"] = beam_width
    return DecodingOptions(**{name: value for name, value in given.items() if value is not None})


def candidate_rows(caption) -> list[list]:
    """A Caption's candidates (best first) -> rows for the table: rank, caption, score (what the decoder
    ranked them by), log-probability, probability (as a percentage, for people)."""
    scores = caption.scores or [log_prob for _, log_prob in caption.candidates]
    return [
        [rank, text, round(score, 2), round(log_prob, 2), readable_probability(math.exp(log_prob))]
        for rank, ((text, log_prob), score) in enumerate(zip(caption.candidates, scores), start=1)
    ]


def readable_probability(probability: float) -> str:
    """A caption's probability for people: '12%' down to 1%, then '1 in 3,400', '1 in 6.6 million'.

    A whole caption's probability is the product of its words' and is often tiny; odds read better than 0.00000015.
    """
    if probability >= 0.01:
        return percent(probability)
    odds = float(f"{1.0 / max(probability, 1e-300):.2g}")
    if odds >= 1e15:
        return "under 1 in a quadrillion"
    for size, name in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million")):
        if odds >= size:
            return f"1 in {odds / size:g} {name}"
    return f"1 in {odds:,.0f}"


def percent(probability: float) -> str:
    """0.934 -> '93%', 0.0123 -> '1.2%', 3.2e-05 -> '0.0032%': two significant digits, readable at any size."""
    value = 100.0 * probability
    if value >= 10:
        return f"{value:.0f}%"
    if value < 1e-4:
        return "< 0.0001%"
    return f"{float(f'{value:.2g}'):g}%"


def word_highlights(explanation: Explanation) -> list[tuple[str, float]]:
    """The caption for gr.HighlightedText: each word with its probability, which sets its shade. One token per
    word (the component spaces them), so a click's index (gr.SelectData.index) is the word's."""
    return [(word.word, round(word.probability, 3)) for word in explanation.words]


def chosen_word(word, explanation: Explanation) -> int:
    """The API's `word` input (a word's position from 0, or None: the first word that names something)."""
    if word is None or word == "":
        return explanation.first_content_word
    try:
        index = float(word)
    except (TypeError, ValueError):
        raise RequestError(f"The word to show must be its position in the caption (0, 1, ...), not {uploads.for_log(repr(word), 40)}.") from None
    count = len(explanation.words)
    if not math.isfinite(index) or index != int(index) or not 0 <= index < count:
        raise RequestError(f"The word to show must be a whole number from 0 to {count - 1}: the caption has {count} words.")
    return int(index)


@dataclass(frozen=True)
class ExplainedPhoto:
    """What a session keeps of its last explanation, for clicks on its words: the words, their probabilities
    and heatmaps, and the photo as a small JPEG (tens of KB, not the decoded image)."""

    words: tuple[str, ...]
    probabilities: tuple[float, ...]
    heatmaps: np.ndarray  # (words, h, w) float16
    photo_jpeg: bytes

    @classmethod
    def of(cls, explanation: Explanation, photo: Image.Image) -> "ExplainedPhoto":
        buffer = io.BytesIO()
        photo.convert("RGB").save(buffer, "JPEG", quality=PHOTO_JPEG_QUALITY)
        return cls(tuple(w.word for w in explanation.words), tuple(w.probability for w in explanation.words),
                   np.stack([w.heatmap for w in explanation.words]).astype(np.float16), buffer.getvalue())

    def overlay(self, index: int) -> Image.Image:
        """The photo with word `index`'s heatmap over it (the JPEG is this app's own, decoded in-process)."""
        return overlay(Image.open(io.BytesIO(self.photo_jpeg)), self.heatmaps[index].astype(np.float32))

    def label(self, index: int) -> str:
        """Markdown under the heatmap: which word it is and how sure the model was of it."""
        return f"Where the model looked for **\u201c{self.words[index]}\u201d** (word {index + 1}, {percent(self.probabilities[index])} sure)"


def batch_uploads(files) -> list:
    """The "Many photos" request's files (Gradio's raw file objects, preprocess=False) -> a list of 1..MAX_BATCH_FILES."""
    if files is None or files == []:
        raise RequestError("Please choose some photos first.")
    if not isinstance(files, list):
        files = [files]
    if len(files) > MAX_BATCH_FILES:
        raise RequestError(f"Too many photos: at most {MAX_BATCH_FILES} at once, not {len(files)}.")
    return files


def upload_name(upload) -> str:
    """The name to show and write for an uploaded file: the uploader's own name for it, else the cache's."""
    if isinstance(upload, dict):
        return str(upload.get("orig_name") or Path(str(upload.get("path") or "")).name or "(unnamed)")
    return Path(str(upload)).name if isinstance(upload, str) and not upload.startswith("data:") else "(unnamed)"


def batch_summary(captioned: int, total: int, seconds: float) -> str:
    failed = total - captioned
    text = f"Captioned **{captioned} of {total}** photo{'s' if total != 1 else ''} in {seconds:.1f} s."
    if failed:
        text += f" {failed} file{' has' if failed == 1 else 's have'} no caption: the table says why."
    return text


RESULTS_DIR = Path(tempfile.gettempdir()) / "captioner-results"
RESULTS_MAX_AGE_S = 3600  # result files are copied into Gradio's cache when sent; our own copies go after an hour


def results_folder() -> Path:
    """A new folder for one request's CSV and JSON files (older ones are deleted)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    for old in RESULTS_DIR.iterdir():
        if time.time() - old.stat().st_mtime > RESULTS_MAX_AGE_S:
            for file in old.iterdir():
                file.unlink(missing_ok=True)
            old.rmdir()
    return Path(tempfile.mkdtemp(dir=RESULTS_DIR))


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

    examples = example_images()
    # The request's image -> pixels: webapp.uploads' checks, then a decode worker (the pool starts here, once).
    images = uploads.RequestImages(captioner.encoder.input_size, examples) if captioner else None

    def caption_pixels(pixels_of, method, beam_width, max_length, length_penalty, prefix=None):
        """The one caption path for uploads and examples alike: pixels_of() gives the checked, decoded image."""
        def work():
            options = decoding_options(method, beam_width, max_length, length_penalty, prefix)
            start = time.perf_counter()
            result = captioner.caption(pixels_of(), options)
            seconds = time.perf_counter() - start
            log.info("%s caption in %.2f s: %s", options.method, seconds, result.text)
            return result.text, candidate_rows(result), model_facts(description, seconds)

        return user_facing(work)

    def caption_image(image, method, beam_width, max_length, length_penalty, prefix=None):
        """Caption one image. method: 'greedy' or 'beam'; prefix: words the caption must start with ("" none).
        Returns the caption, the candidates table and facts."""
        return caption_pixels(lambda: images.upload(image), method, beam_width, max_length, length_penalty, prefix)

    def user_facing(work):
        """Run a request's work: a refusal becomes its sentence for the user, anything else the generic one."""
        try:
            if captioner is None:
                raise RequestError(f"{NOT_LOADED} {unavailable}")
            return work()
        except ValueError as exc:  # InvalidImageError, RequestError and DecodingOptions' checks
            log.info("Rejected a request: %s", uploads.for_log(exc))
            raise user_error(uploads.user_message(exc)) from None
        except Exception:
            log.exception("Captioning failed")
            raise user_error(GENERIC_ERROR) from None

    def explain_pixels(pixels_of, method, beam_width, max_length, length_penalty, prefix, word):
        """The page's view of one photo: the caption word by word, one word's heatmap, the candidates, the facts,
        and what the session keeps for clicks on the words."""
        def work():
            options = decoding_options(method, beam_width, max_length, length_penalty, prefix)
            start = time.perf_counter()
            pixels, display = pixels_of()  # the encoder's square copy, and the photo as it is (aspect kept) to draw on
            explanation = captioner.explain(pixels, options=options)
            shown = chosen_word(word, explanation)
            kept = ExplainedPhoto.of(explanation, Image.fromarray(display))
            seconds = time.perf_counter() - start
            log.info("%s caption explained in %.2f s: %s", options.method, seconds, explanation.text)
            return (explanation.text, word_highlights(explanation), kept.overlay(shown), kept.label(shown),
                    candidate_rows(explanation.caption), model_facts(description, seconds), kept)
        return user_facing(work)

    def explain_image(image, method, beam_width, max_length, length_penalty, prefix=None, word=None):
        """Caption one image and explain each word. method: 'greedy' or 'beam'; prefix: words the caption must
        start with; word: which word's heatmap to draw (its position from 0; default: the first word that names
        something). Returns the caption, its words with their probabilities, the photo with that word's heatmap
        and a line saying which word it is, the candidates table and facts."""
        return explain_pixels(lambda: images.upload(image, OVERLAY_MAX_SIDE), method, beam_width, max_length, length_penalty, prefix, word)

    def explain_example(index, method, beam_width, max_length, length_penalty, prefix=None):
        """A click in the example gallery: only the example's index comes from the page -> the photo and its view."""
        outputs = explain_pixels(lambda: images.example(index, OVERLAY_MAX_SIDE), method, beam_width, max_length, length_penalty, prefix, None)
        return images.examples[index], *outputs

    def show_word(kept: ExplainedPhoto | None, event: gr.SelectData):
        """A click on a word of the highlighted caption -> the photo with that word's heatmap."""
        index = event.index
        if kept is None or type(index) is not int or not 0 <= index < len(kept.words):
            return gr.update(), gr.update()
        return kept.overlay(index), kept.label(index)

    def caption_many(files, method, beam_width, max_length, length_penalty, prefix=None, progress=gr.Progress()):
        """Caption up to MAX_BATCH_FILES photos. Returns a gallery of the captioned ones, a summary, a table of
        every file with its caption or why it has none, and the results as CSV and JSON files."""
        def work():
            options = decoding_options(method, beam_width, max_length, length_penalty, prefix)
            uploads = batch_uploads(files)
            start = time.perf_counter()
            thumbnails: dict[int, np.ndarray] = {}  # each photo as it is (aspect kept), for the gallery

            def reader(position, upload):
                def read():
                    pixels, thumbnails[position] = images.upload(upload, GALLERY_MAX_SIDE)
                    return pixels
                return read

            photos = [(upload_name(upload), reader(i, upload)) for i, upload in enumerate(uploads)]
            progress((0, len(photos)), desc="Captioning", unit="photos")
            results = caption_photos(captioner, photos, options, deadline=time.monotonic() + BATCH_TIME_LIMIT_S,
                                     progress=lambda done, total: progress((done, total), desc="Captioning", unit="photos"))
            seconds = time.perf_counter() - start
            folder = results_folder()
            downloads = [str(write_csv(results, folder / "captions.csv")), str(write_json(results, folder / "captions.json"))]
            gallery = [(Image.fromarray(thumbnails[i]), f"{r.image}: {r.caption}") for i, r in enumerate(results) if r.ok]
            table = [[r.image, r.caption or "", r.error or ""] for r in results]
            log.info("Captioned %d of %d photos in %.2f s", len(gallery), len(results), seconds)
            return gallery, batch_summary(len(gallery), len(results), seconds), table, downloads
        return user_facing(work)

    def decoding_settings() -> list:
        """The decoding widgets (each tab has its own): [method, beam width, max length, length penalty, prefix]."""
        method = gr.Radio(METHOD_CHOICES, value=DEFAULTS.method, label="Decoding")
        beam_width = gr.Slider(
            *BEAM_WIDTH_SLIDER, value=DEFAULTS.beam_width, step=1, label="Beam width", visible=DEFAULTS.method == "beam",
            info="How many partial captions beam search keeps at each step.",
        )
        prefix = gr.Textbox(
            "", label="Start the caption with\u2026 (optional)", placeholder="e.g. a dog", max_lines=1,
            info="The caption begins with these words and the model continues after them.",
        )
        with gr.Accordion("Advanced", open=False):
            max_length = gr.Slider(
                MIN_MAX_LENGTH, default_max_length, value=default_max_length, step=1, label="Max length",
                info="At most this many words after the start (the end-of-caption marker counts as one).",
            )
            length_penalty = gr.Slider(
                *LENGTH_PENALTIES, value=DEFAULTS.length_penalty, step=0.1, label="Length penalty",
                info="Beam search only: above 0 favours longer captions.",
            )
        method.change(
            lambda chosen: gr.update(visible=chosen == "beam"), method, beam_width, api_visibility="private", queue=False,
            preprocess=False,
        )
        return [method, beam_width, max_length, length_penalty, prefix]

    with gr.Blocks(title="Image captioner", **middleware.BLOCKS_OPTIONS) as demo:
        gr.Markdown(
            "# Image captioner\n"
            "A CNN reads the photo and an LSTM writes a sentence about it: upload an image, or pick an example."
        )
        if captioner is None:
            gr.Markdown(f"**{NOT_LOADED}** {unavailable}", elem_id="model-notice")

        with gr.Tabs():
            with gr.Tab("One photo", id="one-photo", elem_id="one-photo"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        image = gr.Image(
                            label="Photo",
                            elem_id="photo",
                            sources=["upload", "webcam", "clipboard"],
                            type="filepath",  # never used to read a file: the events run with preprocess=False (see above)
                            image_mode=None,  # keep the file as it is; load_image handles every mode
                            height=360,
                        )
                        settings = decoding_settings()
                        button = gr.Button("Caption this photo", variant="primary")

                    with gr.Column(scale=1):
                        caption = gr.Textbox(
                            label="Caption", elem_id="caption", lines=2, interactive=False, buttons=["copy"],
                            placeholder="The caption appears here.",
                        )
                        words = gr.HighlightedText(
                            label="Word by word: the darker, the surer the model was. Click a word to see where it looked.",
                            elem_id="words", show_legend=False, show_inline_category=False, interactive=False,
                        )
                        heatmap = gr.Image(
                            label="Where the model looked", elem_id="heatmap", interactive=False, height=300, format="jpeg",
                            buttons=["download"],
                        )
                        heat_note = gr.Markdown("", elem_id="heat-note")
                        candidates = gr.Dataframe(
                            headers=CANDIDATE_HEADERS,
                            datatype=["number", "str", "number", "number", "str"],
                            label="Beam candidates, ranked by score (the log-probability with the length penalty)",
                            elem_id="candidates",
                            interactive=False,
                            wrap=True,
                            column_widths=["5%", "45%", "13%", "14%", "23%"],
                        )
                        facts = gr.Markdown(static_facts, elem_id="facts")
                        explained = gr.State(None)  # the last explanation (ExplainedPhoto), for clicks on its words
                        word = gr.Number(None, visible=False, label="word")  # the API's choice of heatmap; the page's: none

                view = [caption, words, heatmap, heat_note, candidates, facts, explained]
                cleared = ("", [], None, "", [], static_facts, None)
                # No spinner or error badge on the one-line facts: it would cover the text.
                shown = button.click(
                    explain_image, [image, *settings, word], view, api_name="explain", preprocess=False,
                    show_progress_on=[caption, words, heatmap, candidates],
                )
                # After an error, the last photo's view goes: it belongs to another image.
                shown.failure(lambda: cleared, None, view, api_visibility="private", queue=False, show_progress="hidden")
                image.clear(lambda: cleared, None, view, api_visibility="private", queue=False, show_progress="hidden")
                words.select(show_word, explained, [heatmap, heat_note], api_visibility="private", show_progress="hidden")
                # /caption, for API clients: the caption and candidates without the explanation. Not on the page.
                api_only = gr.Button(visible=False)
                api_only.click(caption_image, [image, *settings], [caption, candidates, facts], api_name="caption", preprocess=False)

                if examples:
                    # Not gr.Examples: it registers a second endpoint that runs gr.Image's preprocessing on any path.
                    # A click sends the example's index and the page's settings to explain_example (private).
                    gallery = gr.Dataset(
                        components=[image], samples=[[path] for path in examples], type="index", samples_per_page=12,
                        label="Examples (click one)",
                    )
                    clicked = gallery.click(
                        explain_example, [gallery, *settings], [image, *view], api_visibility="private", preprocess=False,
                        show_progress_on=[caption, words, heatmap, candidates],
                    )
                    clicked.failure(lambda: cleared, None, view, api_visibility="private", queue=False, show_progress="hidden")

            with gr.Tab("Many photos", id="many-photos", elem_id="many-photos"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        batch_files = gr.File(
                            label=f"Photos (up to {MAX_BATCH_FILES})", file_count="multiple", file_types=["image"],
                            elem_id="batch-files", height=260,
                        )
                        batch_settings = decoding_settings()
                        batch_button = gr.Button("Caption all photos", variant="primary")
                    with gr.Column(scale=2):
                        batch_summary_text = gr.Markdown("", elem_id="batch-summary")
                        batch_gallery = gr.Gallery(
                            label="Captions", elem_id="batch-gallery", columns=5, height="auto", object_fit="cover",
                            allow_preview=True,
                        )
                        batch_table = gr.Dataframe(
                            headers=BATCH_HEADERS, label="Every file, with its caption or why it has none",
                            elem_id="batch-table", interactive=False, wrap=True, column_widths=["24%", "46%", "30%"],
                        )
                        batch_downloads = gr.File(
                            label="Download the captions", elem_id="batch-downloads", interactive=False, file_count="multiple",
                        )
                batch_button.click(
                    caption_many, [batch_files, *batch_settings], [batch_gallery, batch_summary_text, batch_table, batch_downloads],
                    api_name="caption_many", preprocess=False, concurrency_limit=BATCH_CONCURRENCY,
                    show_progress_on=[batch_gallery],
                )

        if CREDITS_FILE.is_file():
            with gr.Accordion("Example image credits", open=False):
                gr.Markdown(CREDITS_FILE.read_text(encoding="utf-8"))
        gr.Markdown(
            "Example photos are public domain or CC0; see *Example image credits* above for their sources.",
            elem_id="credits-note",
        )

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE, **middleware.QUEUE_OPTIONS)
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
        allowed_paths=[str(EXAMPLES_DIR)],  # an example click shows the server's own copy
        **middleware.launch_options(demo),  # request limits, session memory, no unused routes (webapp/)
    )


if __name__ == "__main__":
    main()
