"""The Gradio page: upload a photo, get a caption. UI only: the layout, and which handler each event runs.
What an event does is `webapp.handlers.CaptionPage`'s; all captioning logic lives in captioner/.

    python app.py [--share] [--host H] [--port P] [--weights DIR | --repo ID [--revision R]]

With no flags it loads what `Captioner.from_pretrained()` finds ($CAPTIONER_REPO, else the bundled
weights/), and Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself (Hugging Face Spaces sets
them). Without trained weights the page still opens and says how to get them. On the bundled weights the
page's default is the ensemble of the bundled EfficientNet-Lite0 and EfficientNet-Lite1 (loaded at start),
and it offers Lite0 alone, the bundled ResNet50 and the ensemble of Lite0 and ResNet50, loaded when first
chosen (webapp/models.py); started with other weights, those are the default, the bundled models beside them.

Robustness notes:
* The caption events run with `preprocess=False`, so the handlers receive Gradio's raw payload, and
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
import inspect
import logging
from pathlib import Path

import gradio as gr

from captioner import Captioner, WeightsError
from captioner.cli import add_model_arguments, check_model_arguments
from captioner.decoding import (
    BEAM_WIDTHS,
    LENGTH_PENALTIES,
    MAX_SEED,
    NO_REPEAT_NGRAM_SIZES,
    TEMPERATURES,
    DecodingOptions,
    limit_blas_threads,
)
from captioner.image import IMAGE_SUFFIXES, MAX_FILE_BYTES
from webapp import middleware, traffic
from webapp.handlers import BATCH_HEADERS, CANDIDATE_HEADERS, MAX_BATCH_FILES, METHOD_CHOICES, NOT_LOADED, CaptionPage
from webapp.models import ModelChoice, bundled_choices

log = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "examples"
CREDITS_FILE = EXAMPLES_DIR / "CREDITS.md"

CONCURRENCY = 2  # captions computed at once; more only slows each one down on a small CPU machine
QUEUE_SIZE = 64
BATCH_CONCURRENCY = 1  # batches at once, beside the single captions
# The page starts with the recommended decoding: DecodingOptions' defaults, which scored best on the dev split.
DEFAULTS = DecodingOptions()
BEAM_WIDTH_SLIDER = (2, BEAM_WIDTHS[1])  # beam search with width 1 is greedy decoding, the other choice
MIN_MAX_LENGTH = 2
FALLBACK_MAX_LENGTH = 30  # the max-length slider's range when no model is loaded
# Top-p may be any number above 0 up to 1; the slider's first step keeps only the likeliest few words.
TOP_P_SLIDER = (0.05, 1.0)
# The n-gram block's choices: 2 forbids any two words from following each other twice, the strictest useful one.
NGRAM_CHOICES = [("Off", 0), *((f"{size} words", size) for size in NO_REPEAT_NGRAM_SIZES if size)]

# System fonts only: the default themes load Google Fonts, which hangs or fails where there's no internet.
THEME = gr.themes.Soft(
    primary_hue="indigo",
    font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)
CSS = """
#caption textarea { font-size: 1.6rem; line-height: 1.35; font-weight: 600; }
#seen { font-size: 1rem; }
#model-notice { border-left: 4px solid #d97706; padding: 0.5rem 1rem; background: rgba(217, 119, 6, 0.08); }
#facts { font-size: 0.9rem; opacity: 0.85; }
#model-status { font-size: 0.9rem; }
#words .textfield { font-size: 1.25rem; line-height: 2.2; }
/* gr.HighlightedText shades a score in red; turned to the theme's indigo. */
#words .token.highlighted { cursor: pointer; filter: hue-rotate(250deg); }
#heatmap img { object-fit: contain; }
#batch-summary { font-size: 1rem; }
/* The gallery keeps a 320 px box even for one row of photos; let it fit them, and scroll past 3 rows. */
#batch-gallery .grid-wrap { min-height: 0 !important; max-height: 560px; overflow-y: auto; }
"""


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


def example_images() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return sorted(str(p) for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ---- the layout ---------------------------------------------------------------------------------


def inputs(handler, **widgets) -> list:
    """`widgets`, by name, in the order of `handler`'s parameters. Gradio passes an event's inputs by position and
    names its API's parameters after the handler's: the handler's signature is the one place that order is written.
    gr.Progress parameters are Gradio's to fill."""
    parameters = inspect.signature(handler).parameters.values()
    return [widgets[p.name] for p in parameters if not isinstance(p.default, gr.Progress)]


def settings_shown_for(method):
    """Each decoding method's own settings shown only when it is chosen: the beam width and length penalty for
    beam search, temperature, top-p and seed for sampling."""
    beam = gr.update(visible=method == "beam")
    return beam, beam, gr.update(visible=method == "sample")


def decoding_settings(default_max_length: int) -> dict:
    """One tab's decoding widgets (each tab has its own), named as the handlers' parameters."""
    method = gr.Radio(METHOD_CHOICES, value=DEFAULTS.method, label="Decoding")
    beam_width = gr.Slider(
        *BEAM_WIDTH_SLIDER, value=DEFAULTS.beam_width, step=1, label="Beam width", visible=DEFAULTS.method == "beam",
        info="How many partial captions beam search keeps at each step.",
    )
    with gr.Group(visible=DEFAULTS.method == "sample") as sampling:
        temperature = gr.Slider(
            *TEMPERATURES, value=DEFAULTS.temperature, step=0.05, label="Temperature",
            info="Below 1: safer, commoner words; above 1: more surprising ones.",
        )
        top_p = gr.Slider(
            *TOP_P_SLIDER, value=DEFAULTS.top_p, step=0.05, label="Top-p",
            info="Each word is drawn from the likeliest words that together have this probability (1: from all).",
        )
        # Text, not gr.Number: a Number can't be empty (Gradio 6 shows and sends 0 for None), which would fix every draw.
        seed = gr.Textbox(
            "", label="Seed (optional)", placeholder="empty: a new caption each time", max_lines=1,
            info=f"A whole number from 0 to {MAX_SEED:,}: the same seed gives the same caption again.",
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
            visible=DEFAULTS.method == "beam", info="Above 0 favours longer captions.",
        )
        no_repeat_ngram_size = gr.Radio(
            NGRAM_CHOICES, value=DEFAULTS.no_repeat_ngram_size, label="Never repeat a phrase of",
            info="No run of this many words appears twice in a caption (\u201ca dog \u2026 a dog\u201d).",
        )
    name_objects = gr.Checkbox(
        DEFAULTS.name_objects, label="Name what the image classifier is sure of",
        info="The caption must include a word for the objects the encoder's ImageNet classifier is sure of "
             "(a cat, a pizza), where the language model puts it best. Greedy and beam search only.",
    )
    method.change(
        settings_shown_for, method, [beam_width, length_penalty, sampling], api_visibility="private", queue=False,
        preprocess=False,
    )
    return {"method": method, "beam_width": beam_width, "max_length": max_length, "length_penalty": length_penalty,
            "prefix": prefix, "no_repeat_ngram_size": no_repeat_ngram_size, "temperature": temperature, "top_p": top_p,
            "seed": seed, "name_objects": name_objects}


def build_demo(captioner: Captioner | None, unavailable_reason: str | None = None,
               more_models: list[ModelChoice] | None = None) -> gr.Blocks:
    """The Blocks app around `captioner`, the model the app started with, and `more_models` to choose from (None: the
    bundled ones; webapp.models.page_models chooses the default); with no captioner, a page explaining
    `unavailable_reason`."""
    if more_models is None:
        more_models = bundled_choices(captioner) if captioner is not None else []
    page = CaptionPage(captioner, example_images(), unavailable_reason, more_models=more_models)
    default_max_length = captioner.config.max_new_tokens if captioner else FALLBACK_MAX_LENGTH

    with gr.Blocks(title="Image captioner", **middleware.BLOCKS_OPTIONS) as demo:
        gr.Markdown(
            "# Image captioner\n"
            "A CNN reads the photo and an LSTM writes a sentence about it: upload an image, or pick an example."
        )
        if captioner is None:
            gr.Markdown(f"**{NOT_LOADED}** {page.notice}", elem_id="model-notice")
        model, model_status = model_choice(page)

        with gr.Tabs():
            with gr.Tab("One photo", id="one-photo", elem_id="one-photo"):
                one_photo_tab(page, default_max_length, model, model_status)
            with gr.Tab("Many photos", id="many-photos", elem_id="many-photos"):
                many_photos_tab(page, default_max_length, model, model_status)

        if CREDITS_FILE.is_file():
            with gr.Accordion("Example image credits", open=False):
                gr.Markdown(CREDITS_FILE.read_text(encoding="utf-8"))
        gr.Markdown(
            "Example photos are public domain or CC0; see *Example image credits* above for their sources.",
            elem_id="credits-note",
        )

        # A model another visitor found can't be loaded here is marked so in the menu from the start.
        demo.load(page.model_menu, None, model, api_visibility="private", queue=False, show_progress="hidden")

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE, **middleware.QUEUE_OPTIONS)
    return demo


def model_choice(page: CaptionPage) -> tuple[gr.Dropdown, gr.Markdown]:
    """The model menu above both tabs (the default first and chosen) and the line about the chosen model. Hidden
    when there is only the one model; it stays an input, so the API's `model` parameter is always there."""
    choices = page.models.menu() if page.models is not None else []
    with gr.Row(equal_height=False, visible=len(choices) > 1):
        model = gr.Dropdown(
            choices, value=page.models.default.name if choices else None, label="Model", elem_id="model", scale=1,
            filterable=False,
            info="Test CIDEr: each model's score on Flickr8k's test photos (higher is better). The default is "
                 "loaded; the others load when first chosen (a few seconds).",
        )
        status = gr.Markdown(page.model_status(), elem_id="model-status")
    model.change(page.model_status, model, status, api_visibility="private", queue=False, preprocess=False,
                 show_progress="hidden")
    return model, status


def one_photo_tab(page: CaptionPage, default_max_length: int, model: gr.Dropdown, model_status: gr.Markdown) -> None:
    """One photo: its caption word by word, where the model looked for each word, the beam's candidates."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            image = gr.Image(
                label="Photo",
                elem_id="photo",
                sources=["upload", "webcam", "clipboard"],
                type="filepath",  # never used to read a file: the events run with preprocess=False (see above)
                image_mode=None,  # keep the file as it is; the decode workers handle every mode
                height=360,
            )
            settings = decoding_settings(default_max_length)
            button = gr.Button("Caption this photo", variant="primary")

        with gr.Column(scale=1):
            caption = gr.Textbox(
                label="Caption", elem_id="caption", lines=2, interactive=False, buttons=["copy"],
                placeholder="The caption appears here.",
            )
            # What the encoder's ImageNet classifier sees, or the sentence that flags an unfamiliar photo.
            seen = gr.Markdown("", elem_id="seen")
            # The same as data, for API clients (objects, familiar, familiarity); the page shows the sentence.
            seen_data = gr.JSON(None, visible=False, label="what the encoder sees")
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
                label="Candidates, ranked by score: the log-probability (with beam search, divided by the length penalty)",
                elem_id="candidates",
                interactive=False,
                wrap=True,
                column_widths=["5%", "45%", "13%", "14%", "23%"],
            )
            facts = gr.Markdown(page.facts, elem_id="facts")
            explained = gr.State(None)  # the last explanation (ExplainedPhoto), for clicks on its words
            word = gr.Number(None, visible=False, label="word")  # the API's choice of heatmap; the page's: none

    view = [caption, words, heatmap, heat_note, candidates, facts, seen, seen_data, explained]

    def cleared(chosen):  # the view with no photo: the chosen model's facts line
        return "", [], None, "", [], page.facts_for(chosen), "", None, None

    def failed(chosen):  # and the model's menu and line again: a model that just failed to load is marked so
        return *cleared(chosen), page.model_menu(), page.model_status(chosen)

    # No spinner or error badge on the one-line facts: it would cover the text.
    shown = button.click(
        page.explain, inputs(page.explain, image=image, word=word, model=model, **settings), view, api_name="explain",
        preprocess=False, show_progress_on=[caption, words, heatmap, candidates],
    )
    # After an error, the last photo's view goes: it belongs to another image.
    shown.failure(failed, model, [*view, model, model_status], api_visibility="private", queue=False,
                  show_progress="hidden", preprocess=False)
    image.clear(cleared, model, view, api_visibility="private", queue=False, show_progress="hidden", preprocess=False)
    words.select(page.show_word, explained, [heatmap, heat_note], api_visibility="private", show_progress="hidden")
    # /caption, for API clients: the caption and candidates without the explanation. Not on the page.
    api_only = gr.Button(visible=False)
    api_only.click(page.caption, inputs(page.caption, image=image, model=model, **settings),
                   [caption, candidates, facts, seen_data], api_name="caption", preprocess=False)

    if page.examples:
        # Not gr.Examples: it registers a second endpoint that runs gr.Image's preprocessing on any path.
        # A click sends the example's index and the page's settings to explain_example (private).
        gallery = gr.Dataset(
            components=[image], samples=[[path] for path in page.examples], type="index", samples_per_page=12,
            label="Examples (click one)",
        )
        clicked = gallery.click(
            page.explain_example, inputs(page.explain_example, index=gallery, model=model, **settings), [image, *view],
            api_visibility="private", preprocess=False, show_progress_on=[caption, words, heatmap, candidates],
        )
        clicked.failure(failed, model, [*view, model, model_status], api_visibility="private", queue=False,
                        show_progress="hidden", preprocess=False)


def many_photos_tab(page: CaptionPage, default_max_length: int, model: gr.Dropdown, model_status: gr.Markdown) -> None:
    """Many photos: a gallery of captions, a table of every file with its caption or why it has none, downloads."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            files = gr.File(
                label=f"Photos (up to {MAX_BATCH_FILES})", file_count="multiple", file_types=["image"],
                elem_id="batch-files", height=260,
            )
            settings = decoding_settings(default_max_length)
            button = gr.Button("Caption all photos", variant="primary")
        with gr.Column(scale=2):
            summary = gr.Markdown("", elem_id="batch-summary")
            gallery = gr.Gallery(
                label="Captions", elem_id="batch-gallery", columns=5, height="auto", object_fit="cover",
                allow_preview=True,
            )
            table = gr.Dataframe(
                headers=BATCH_HEADERS, label="Every file, with its caption or why it has none",
                elem_id="batch-table", interactive=False, wrap=True, column_widths=["18%", "34%", "22%", "26%"],
            )
            downloads = gr.File(
                label="Download the captions", elem_id="batch-downloads", interactive=False, file_count="multiple",
            )
    done = button.click(
        page.caption_many, inputs(page.caption_many, files=files, model=model, **settings),
        [gallery, summary, table, downloads], api_name="caption_many", preprocess=False,
        concurrency_limit=BATCH_CONCURRENCY, show_progress_on=[gallery],
    )
    done.failure(lambda chosen: (page.model_menu(), page.model_status(chosen)), model, [model, model_status],
                 api_visibility="private", queue=False, show_progress="hidden", preprocess=False)


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
    traffic.trust_space_proxies()  # each visitor their own client behind a Space's proxies (webapp/traffic.py)
    demo.launch(
        share=args.share,
        server_name=args.host,
        server_port=args.port,
        theme=THEME,  # Gradio 6 takes theme and css in launch(), not in Blocks()
        css=CSS,
        max_file_size=MAX_FILE_BYTES,
        allowed_paths=[str(EXAMPLES_DIR)],  # an example click shows the server's own copy
        **middleware.launch_options(demo, max_files_per_upload=MAX_BATCH_FILES),  # request limits, session memory, no unused routes (webapp/)
    )


if __name__ == "__main__":
    main()
