"""What the page's events do: `CaptionPage`, whose methods app.py wires to its buttons, and the helpers that turn
a caption into what the page shows. No layout here (app.py), and no Gradio server needed to call them:

    page = CaptionPage(captioner, examples)             # starts the decode workers (webapp.uploads.RequestImages)
    caption, candidates, facts, seen = page.caption(upload, "beam", 5)
    gallery, summary, table, downloads = page.caption_many([upload, ...], "greedy")
    page = CaptionPage(captioner, examples, more_models=bundled_choices(captioner))   # a model choice (webapp/models.py)
    caption, *_ = page.caption(upload, "beam", 5, model="resnet50")                     # loaded on first use
    # (on the bundled weights the default is then the Lite0 + Lite1 ensemble, and captioner is offered as "lite0")

Each handler takes the request's values as Gradio sends them with preprocess=False (file objects, numbers,
strings; None for a value not given) and turns the decoding settings into one `DecodingOptions` on its first
line, then asks `ModelChoices` for the model the request chose (`model`: None is the default). Its parameters are
the API's: Gradio names an endpoint's parameters after its function's, in order.
A request the app can't serve raises gr.Error with a sentence for the user (see `user_facing`).
"""

from __future__ import annotations

import functools
import html
import io
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from captioner import Captioner, DecodingOptions, Ensemble
from captioner.explain import OVERLAY_MAX_SIDE, Explanation, overlay
from captioner.visual import unfamiliar_note

from . import uploads
from .many_photos import caption_photos, read_once, write_csv, write_json
from .models import ModelChoice, page_models
from .sessions import KEPT_VIEWS, VIEW_GONE
from .uploads import RequestError, RequestImages

log = logging.getLogger("app")

# ---- limits ---------------------------------------------------------------------------------------

MAX_BATCH_FILES = 50  # photos per "Many photos" request: about 2-4 s of work here
# A batch of crafted files could keep the decode workers at their deadline file after file: the files not read
# within this time are listed as not captioned, with a sentence asking to send them again.
BATCH_TIME_LIMIT_S = 60.0
GALLERY_MAX_SIDE = 512  # the "Many photos" gallery shows each photo at most this many pixels a side (50 of them: ~40 MB)
PHOTO_JPEG_QUALITY = 85  # the explained photo is kept per session as a small JPEG, for the word clicks
RESULTS_DIR = Path(tempfile.gettempdir()) / "captioner-results"
RESULTS_MAX_AGE_S = 3600  # result files are copied into Gradio's cache when sent; our own copies go after an hour

# ---- what the page shows ------------------------------------------------------------------------

# The method radio's choices are (label, value); the API also accepts the labels, in any case.
METHOD_CHOICES = [("Greedy", "greedy"), ("Beam search", "beam"), ("Sampling", "sample")]
METHODS = {name.lower(): value for label, value in METHOD_CHOICES for name in (label, value)}
# score: what beam search ranks by, the log-probability divided by ((5 + length) / 6) ** length penalty.
CANDIDATE_HEADERS = ["#", "caption", "score", "log-prob", "probability"]
BATCH_HEADERS = ["file", "caption", "why it has no caption", "what the classifier sees"]

NOT_LOADED = "The captioning model isn't loaded."
GENERIC_ERROR = "Something went wrong while captioning this image. Please try again, or try another image."
FIX_WEIGHTS_HINT = (
    "To fix this, train the model with `python -m training.run_all` (it writes `weights/`), or set "
    "`CAPTIONER_REPO` to a Hugging Face Hub model repo, then restart the app."
)


def decoding_options(method=None, beam_width=None, max_length=None, length_penalty=None, prefix=None,
                     no_repeat_ngram_size=None, temperature=None, top_p=None, seed=None, name_objects=None) -> DecodingOptions:
    """The page's widgets (or an API call's values) -> the library's DecodingOptions, whose checks are the only
    ones. None means the default. A method's own settings count only for it: greedy decoding and sampling ignore
    the beam width, greedy decoding and beam search the temperature, top-p and seed (the page sends every widget,
    shown or not). prefix: the words the caption must start with ("" or None: none); seed: None or blank, a new
    sample each time."""
    method = METHODS.get(str(method).strip().lower(), method) if method is not None else None
    if isinstance(seed, str) and not seed.strip():  # the page's seed box, left empty
        seed = None
    given = {"method": method, "max_new_tokens": max_length, "length_penalty": length_penalty, "prefix": prefix,
             "no_repeat_ngram_size": no_repeat_ngram_size, "name_objects": name_objects}
    if method == "beam":
        given["beam_width"] = beam_width
    if method == "sample":
        given.update(temperature=temperature, top_p=top_p, seed=seed)
    return DecodingOptions(**{name: value for name, value in given.items() if value is not None})


def user_facing(handler):
    """A handler whose refusals reach the user as sentences: ValueError (InvalidImageError, RequestError and
    DecodingOptions' checks) as its own message, anything else as GENERIC_ERROR (the details go to the log)."""

    @functools.wraps(handler)  # Gradio reads the handler's signature: the API's parameter names
    def answer(page: CaptionPage, *args, **kwargs):
        try:
            if page.captioner is None:
                raise RequestError(f"{NOT_LOADED} {page.notice}")
            return handler(page, *args, **kwargs)
        except ValueError as exc:
            log.info("Rejected a request: %s", uploads.for_log(exc))
            raise user_error(uploads.user_message(exc)) from None
        except Exception:
            log.exception("Captioning failed")
            raise user_error(GENERIC_ERROR) from None

    return answer


def user_error(message: str) -> gr.Error:
    # gr.Error renders its message as HTML in the browser; file names and the like must show as text.
    return gr.Error(html.escape(message, quote=False), print_exception=False)


# ---- the handlers -----------------------------------------------------------------------------------


class CaptionPage:
    """The page's handlers around the captioner the app started with (None: every request is answered with why there
    is none) and the other models a request may choose (`more_models`, loaded on first use: webapp/models.py, whose
    `page_models` makes the bundled Lite0 + Lite1 ensemble the default when the app started on the bundled weights).

    images: how a request's image becomes pixels (default: RequestImages over Gradio's upload cache and `examples`,
    which starts the decode workers once, here); a model with another input size gets its own, on the same workers.
    """

    def __init__(self, captioner: Captioner | None, examples: Sequence[str] = (), unavailable_reason: str | None = None,
                 images: RequestImages | None = None, more_models: Sequence[ModelChoice] = ()):
        self.captioner = captioner
        self.examples = [str(path) for path in examples]
        if captioner is None:
            self.images = None
            self.models = None
            # Why there's no model and what to do. "No trained weights" errors already say how to get them;
            # the others (damaged files, the Hub unreachable) don't.
            reason = unavailable_reason or "No weights were loaded."
            self.notice = reason if "training.run_all" in reason else f"{reason} {FIX_WEIGHTS_HINT}"
        else:
            self.images = images or RequestImages(captioner.encoder.input_size, self.examples)
            self._images_by_size = {tuple(self.images.input_size): self.images}
            self.models = page_models(captioner, more_models)
            self.notice = None
        self.facts = self.facts_for(None)  # the facts line before any caption: the default model's

    # ---- the model a request chose ----------------------------------------------------------------

    def _images_for(self, model) -> RequestImages:
        """The decode workers' pixels at `model`'s input size."""
        size = tuple(model.input_size)  # (a Captioner's is its encoder's; an Ensemble's its largest member's)
        if size not in self._images_by_size:
            self._images_by_size[size] = RequestImages(size, self.examples, self.images.pool, self.images.upload_dir)
        return self._images_by_size[size]

    def facts_for(self, model=None) -> str:
        """The facts line for a model chosen but not used yet (the page's start, a cleared view): its name and
        scores, and, until it is loaded, that it loads on first use. An unknown name: the default's."""
        if self.models is None:
            return ""
        try:
            choice = self.models.choice(model)
        except ValueError:
            choice = self.models.default
        if choice.is_loaded:
            return model_facts(choice.model().description, name=choice.label)
        scores = score_summary(choice.metrics)
        state = "can't be loaded here" if choice.failure else "loads when first used"
        return " \u00b7 ".join(part for part in (f"**{choice.label}**", scores, state) if part)

    def model_status(self, model=None) -> str:
        """The line beside the model menu: what the chosen model is (and can't do), and why it can't be loaded here once it
        has failed to."""
        if self.models is None:
            return ""
        try:
            return self.models.choice(model).status()
        except ValueError:
            return ""

    def model_menu(self):
        """The dropdown's choices again: a model that failed to load is marked so."""
        return gr.update(choices=self.models.menu()) if self.models is not None else gr.update()

    @user_facing
    def caption(self, image, method=None, beam_width=None, max_length=None, length_penalty=None, prefix=None,
                no_repeat_ngram_size=None, temperature=None, top_p=None, seed=None, name_objects=None, model=None):
        """Caption one image. method: 'greedy', 'beam' or 'sample'; prefix: words the caption must start with;
        model: which of the page's models (None: the default). Returns the caption, the candidates table, facts
        and what the encoder sees (seen_data: objects, familiar)."""
        options = decoding_options(method, beam_width, max_length, length_penalty, prefix, no_repeat_ngram_size,
                                   temperature, top_p, seed, name_objects)
        choice, captioner = self.models.get(model)  # loaded on first use: not counted in the caption's time
        start = time.perf_counter()
        # The decode worker's pixels go straight to the encoder (Captioner.encode_pixels), as a batch of one.
        result = captioner.caption_pixels(self._images_for(captioner).upload(image)[None], options)[0]
        seconds = time.perf_counter() - start
        log.info("%s %s caption in %.2f s: %s", choice.name, options.method, seconds, result.text)
        return result.text, candidate_rows(result), model_facts(captioner.description, seconds, choice.label), seen_data(result)

    @user_facing
    def explain(self, image, method=None, beam_width=None, max_length=None, length_penalty=None, prefix=None,
                word=None, no_repeat_ngram_size=None, temperature=None, top_p=None, seed=None, name_objects=None,
                model=None):
        """Caption one image and explain each word. word: which word's heatmap to draw (its position from 0;
        default: the first word that names something); it comes before the settings added later, where API
        clients already pass it. Returns the caption, its words with their probabilities, the photo with that
        word's heatmap and a line saying which word it is, the candidates table, facts and what the session
        keeps for clicks on the words; after the facts, what the encoder sees, as a sentence and as data (objects,
        familiar). model: as caption's (an ensemble's words are its heaviest member's view of its caption)."""
        options = decoding_options(method, beam_width, max_length, length_penalty, prefix, no_repeat_ngram_size,
                                   temperature, top_p, seed, name_objects)
        choice, captioner = self.models.get(model)
        start = time.perf_counter()
        return self._view(*self._images_for(captioner).upload(image, OVERLAY_MAX_SIDE), options, word, start, choice, captioner)

    @user_facing
    def explain_example(self, index, method=None, beam_width=None, max_length=None, length_penalty=None, prefix=None,
                        no_repeat_ngram_size=None, temperature=None, top_p=None, seed=None, name_objects=None,
                        model=None):
        """A click in the example gallery: only the example's index comes from the page -> the photo and its view."""
        options = decoding_options(method, beam_width, max_length, length_penalty, prefix, no_repeat_ngram_size,
                                   temperature, top_p, seed, name_objects)
        choice, captioner = self.models.get(model)
        start = time.perf_counter()
        view = self._view(*self._images_for(captioner).example(index, OVERLAY_MAX_SIDE), options, None, start, choice, captioner)
        return self.examples[index], *view

    def _view(self, pixels, display, options: DecodingOptions, word, start: float, choice: ModelChoice, captioner) -> tuple:
        """The page's view of one photo: pixels, the encoder's square copy; display, the photo as it is (aspect
        kept) to draw on."""
        explanation = captioner.explain_pixels(pixels, display, options=options)
        shown = chosen_word(word, explanation)
        # An ensemble's heatmaps are one member's (Grad-CAM follows one network): the label says whose.
        looker = captioner.explained_by if isinstance(captioner, Ensemble) else "the model"
        kept = ExplainedPhoto.of(explanation, explanation.image, looker)
        seconds = time.perf_counter() - start
        log.info("%s %s caption explained in %.2f s: %s", choice.name, options.method, seconds, explanation.text)
        return (explanation.text, word_highlights(explanation), kept.overlay(shown), kept.label(shown),
                candidate_rows(explanation.caption), model_facts(captioner.description, seconds, choice.label),
                seen_note(explanation.caption), seen_data(explanation.caption), kept)

    @staticmethod
    def show_word(kept: ExplainedPhoto | None, event: gr.SelectData):
        """A click on a word of the highlighted caption -> the photo with that word's heatmap, and its label."""
        index = event.index
        if kept is None or type(index) is not int or not 0 <= index < len(kept.words):
            return gr.update(), gr.update()
        if not kept.available:
            return gr.update(), VIEW_GONE
        return kept.overlay(index), kept.label(index)

    @user_facing
    def caption_many(self, files, method=None, beam_width=None, max_length=None, length_penalty=None, prefix=None,
                     no_repeat_ngram_size=None, temperature=None, top_p=None, seed=None, name_objects=None,
                     model=None, progress=gr.Progress()):
        """Caption up to MAX_BATCH_FILES photos with the chosen model (None: the default). Returns a gallery of the
        captioned ones, a summary, a table of every file with its caption or why it has none, and the results as
        CSV and JSON files."""
        options = decoding_options(method, beam_width, max_length, length_penalty, prefix, no_repeat_ngram_size,
                                   temperature, top_p, seed, name_objects)
        files = batch_uploads(files)
        choice, captioner = self.models.get(model)
        images = self._images_for(captioner)
        start = time.perf_counter()
        thumbnails: dict[int, np.ndarray] = {}  # each photo as it is (aspect kept), for the gallery
        decode = read_once(lambda upload: images.upload(upload, GALLERY_MAX_SIDE))  # a file named twice: once

        def reader(position, upload):
            def read():
                pixels, thumbnails[position] = decode(upload)
                return pixels
            return read

        photos = [(upload_name(upload), reader(i, upload)) for i, upload in enumerate(files)]
        progress((0, len(photos)), desc="Captioning", unit="photos")
        results = caption_photos(captioner, photos, options, deadline=time.monotonic() + BATCH_TIME_LIMIT_S,
                                 progress=lambda done, total: progress((done, total), desc="Captioning", unit="photos"))
        seconds = time.perf_counter() - start
        folder = results_folder()
        downloads = [str(write_csv(results, folder / "captions.csv")), str(write_json(results, folder / "captions.json"))]
        gallery = [(Image.fromarray(thumbnails[i]), f"{r.image}: {r.caption}") for i, r in enumerate(results) if r.ok]
        table = [[r.image, r.caption or "", r.error or "", seen_summary(r.objects, r.familiar)] for r in results]
        log.info("Captioned %d of %d photos with %s in %.2f s", len(gallery), len(results), choice.name, seconds)
        return gallery, batch_summary(len(gallery), len(results), seconds), table, downloads


# ---- what a caption looks like on the page ------------------------------------------------------


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
    word (the component spaces them), so a click's index (gr.SelectData.index) is the word's. A caption of an
    unfamiliar photo is shown unshaded (0): the model's sureness of "dog" means nothing on a photo of a kitchen."""
    if explanation.caption.familiar is False:
        return [(word.word, 0.0) for word in explanation.words]
    return [(word.word, round(word.probability, 3)) for word in explanation.words]


def seen_note(caption) -> str:
    """Markdown under the caption: what the encoder's ImageNet classifier sees, and, for an unfamiliar photo, the
    sentence that says the caption is a guess."""
    if caption.familiar is False:
        return f"\u26a0\ufe0f {html.escape(unfamiliar_note(caption.objects))}"
    if not caption.objects:
        return ""
    return "The image classifier sees: " + ", ".join(f"{html.escape(name)} ({percent(p)})" for name, p in caption.objects)


def seen_data(caption) -> dict:
    """What the encoder sees, for API clients: the ImageNet classes with their probabilities, best first, and
    whether the photo is familiar (None: the weights can't tell) with the score that says so."""
    return {"objects": [{"name": name, "probability": p} for name, p in caption.objects],
            "familiar": caption.familiar, "familiarity": caption.familiarity}


def seen_summary(objects, familiar) -> str:
    """The many-photos table's cell: the likeliest classes, and a mark on unfamiliar photos."""
    if objects is None:
        return ""
    seen = ", ".join(f"{name} {percent(p)}" for name, p in objects)
    return seen + (" (unfamiliar photo: the caption is a guess)" if familiar is False else "")


def chosen_word(word, explanation: Explanation) -> int:
    """The API's `word` input (a word's position from 0, or None: the first word that names something)."""
    if word is None or word == "":
        return explanation.first_content_word
    try:
        if isinstance(word, bool):  # True would be word 1, where every other setting refuses booleans
            raise TypeError
        index = float(word)
    except (TypeError, ValueError):
        raise RequestError(f"The word to show must be its position in the caption (0, 1, ...), not {uploads.for_log(repr(word), 40)}.") from None
    count = len(explanation.words)
    if not math.isfinite(index) or index != int(index) or not 0 <= index < count:
        raise RequestError(f"The word to show must be a whole number from 0 to {count - 1}: the caption has {count} words.")
    return int(index)


@dataclass(frozen=True)
class ExplainedPhoto:
    """What a session keeps of its last explanation, for clicks on its words: the words, their probabilities,
    and the key of its heatmaps and photo (a small JPEG) in sessions.KEPT_VIEWS, which bounds them in total
    (about 0.65 MB a session otherwise, for as many sessions as Gradio keeps)."""

    words: tuple[str, ...]
    probabilities: tuple[float, ...] | None  # None for an unfamiliar photo's caption: its sureness means nothing
    key: str  # of (heatmaps (words, h, w) float16, photo JPEG) in KEPT_VIEWS
    looker: str = "the model"  # whose heatmaps they are: an ensemble's are one member's

    @classmethod
    def of(cls, explanation: Explanation, photo: Image.Image, looker: str = "the model") -> ExplainedPhoto:
        buffer = io.BytesIO()
        photo.convert("RGB").save(buffer, "JPEG", quality=PHOTO_JPEG_QUALITY)
        heatmaps = np.stack([w.heatmap for w in explanation.words]).astype(np.float16)
        key = KEPT_VIEWS.put((heatmaps, buffer.getvalue()), heatmaps.nbytes + buffer.tell())
        probabilities = None if explanation.caption.familiar is False else tuple(w.probability for w in explanation.words)
        return cls(tuple(w.word for w in explanation.words), probabilities, key, looker)

    @property
    def available(self) -> bool:
        """False once KEPT_VIEWS has let the heatmaps go (a view not looked at for a long while)."""
        return KEPT_VIEWS.get(self.key) is not None

    def overlay(self, index: int) -> Image.Image:
        """The photo with word `index`'s heatmap over it (the JPEG is this app's own, decoded in-process)."""
        heatmaps, photo_jpeg = KEPT_VIEWS.get(self.key)
        return overlay(Image.open(io.BytesIO(photo_jpeg)), heatmaps[index].astype(np.float32))

    def label(self, index: int) -> str:
        """Markdown under the heatmap: which word it is and how sure the model was of it."""
        sure = "" if self.probabilities is None else f", {percent(self.probabilities[index])} sure"
        return f"Where {self.looker} looked for **\u201c{self.words[index]}\u201d** (word {index + 1}{sure})"


def model_facts(description: dict, seconds: float | None = None, name: str | None = None) -> str:
    """One Markdown line about a loaded model: its name (the page's label for it, when given), encoder, decoder step
    (int8 or float32), weights, vocabulary and test scores (and how long the last caption took)."""
    source = description.get("source") or "unknown source"
    revision = description.get("revision")
    encoders = "Encoders" if " + " in description["encoder"] else "Encoder"  # an ensemble's: each member's
    facts = [
        *([f"**{name}**"] if name else []),
        f"{encoders} `{description['encoder']}`",
        *([f"decoder step {description['decoder']}"] if description.get("decoder") else []),
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


# ---- many photos --------------------------------------------------------------------------------


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


def results_folder() -> Path:
    """A new folder for one request's CSV and JSON files (older ones are deleted)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    for old in RESULTS_DIR.iterdir():
        if time.time() - old.stat().st_mtime > RESULTS_MAX_AGE_S:
            for file in old.iterdir():
                file.unlink(missing_ok=True)
            old.rmdir()
    return Path(tempfile.mkdtemp(dir=RESULTS_DIR))
