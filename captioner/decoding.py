"""Decoding: an image's features in, its captions out, one token at a time (after openai/whisper's decoding.py).

    DecodingOptions  how to decode: the one description the app, the CLI, the batch job and training pass
                     whole, and the only range checks
    DecodingTask     one setting resolved for one model: the prompt's tokens, the step budget, the logit
                     filters and the decoder, worked out once; its `run` is the one decoding loop
    TokenDecoder     how the next tokens are chosen: GreedyDecoder, BeamSearchDecoder, SamplingDecoder, and
                     ConstrainedBeamSearchDecoder for captions that must name given words (name_objects)
    LogitFilter      a rule that forbids tokens at a step: NoRepeatNgram, NoRepeatedWords (unless repeat_words),
                     and NoCutOffEnding where the vocabulary names the words no caption ends on
    Hypothesis       one caption's tokens, log-probability and score; Caption, one image's result

Each step the network (model.StepModel) gives every live caption's next-token logits, and the task turns
them into log-probabilities in one place, `DecodingTask.log_probs`: the model's softmax over the tokens a
caption may contain (the vocabulary's rule: never padding, start or unknown, and <end> never first, so that
no caption is empty and none has holes where a token was cut out later), then each logit filter. The decoder
chooses from them and says which captions go on; the task keeps the network state of those.

Adding a decoding method: a TokenDecoder in DECODERS, and its fields in DecodingOptions with their checks.

Naming what the encoder sees (`name_objects`): the encoder's ImageNet classifier says which objects it is sure of,
and VisualWords (visual.py) which caption words name them; each image's caption must then contain one word of each
such group, placed where the language model puts it best: constrained beam search (Anderson et al. 2017), whose
beams are kept apart by which groups they have named. Words the vocabulary lacks ("pizza") join it for these
images only (`Naming`: the vocabulary and the network grown by them). An image with nothing to name is decoded as
without the option, by the method's own decoder: its caption is the same, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
from threadpoolctl import threadpool_limits

from .model import StepModel
from .visual import VisualWords
from .vocabulary import SPECIAL_TOKENS, Vocabulary, normalize_caption

METHODS = ("greedy", "beam", "sample")  # DECODERS, at the end, gives each its TokenDecoder
# Beam search costs in proportion to its width; width 10 already scores below 3 and 5 on the dev split.
BEAM_WIDTHS = (1, 10)
# The longest training caption has 38 tokens: 100 is far beyond any useful caption and bounds a request's work.
MAX_NEW_TOKENS = 100
LENGTH_PENALTIES = (0.0, 5.0)
# A prompt is the start of a caption: a few words (and a bounded cost to read back to the user in errors).
MAX_PREFIX_WORDS, MAX_PREFIX_CHARS = 20, 200
NO_REPEAT_NGRAM_SIZES = (0, 2, 3, 4)  # 0: off; 1 would forbid repeating any word, even "a"
# Below 0.1 sampling picks the likeliest word nearly every time (greedy decoding does that exactly); above 2
# the unlikely words are drawn about as often as the likely ones and the captions stop making sense.
TEMPERATURES = (0.1, 2.0)
MAX_SEED = 2**32 - 1  # any seed NumPy takes; a page's number field holds it exactly


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode. The defaults are the recommended decoding: the setting that scored best on the dev split."""

    method: str = "beam"  # "greedy", "beam" or "sample"
    beam_width: int = 5  # used by "beam"; beam search of width 1 is greedy
    max_new_tokens: int | None = None  # most tokens to generate after the prefix, <end> included; None: the model's
    length_penalty: float = 2.0  # beam search ranks by GNMT log_prob / ((5 + length) / 6) ** alpha; 0: by log_prob
    prefix: str = ""  # words the caption must start with ("a dog"); decoding continues after them
    no_repeat_ngram_size: int = 0  # forbid any n-gram of this size from appearing twice in a caption; 0: off
    # "sample" draws each word at random from the model's probabilities raised to 1 / temperature (below 1:
    # safer captions; above 1: more varied), among the likeliest words that together hold top_p of the
    # probability (nucleus sampling, Holtzman et al. 2020, whose 0.9 cuts off the long tail of unlikely words).
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int | None = None  # "sample": the same seed gives an image the same caption; None: a new draw each time
    # The caption names the objects the encoder's ImageNet classifier is sure of ("a cat", "a pizza"), for greedy
    # decoding and beam search; sampling ignores it, and so do weights folders without a classifier and word map.
    # On by default: on the bundled model it raises dev CIDEr on Flickr8k and on COCO photos (README).
    name_objects: bool = True
    # Off by default, a caption names nothing twice: no word but a function word ("a", "on", "the") appears twice
    # ("a little girl is holding a camera on a camera"), and none right after itself. It scored better on dev (README).
    repeat_words: bool = False

    def __post_init__(self):
        # Requests bring numbers as floats or strings: check and convert them here, with sentences for users.
        # Every field is checked, whichever method uses it.
        method = str(self.method).strip().lower()
        if method not in METHODS:
            raise ValueError(f"The decoding method must be 'greedy', 'beam' or 'sample', not {_shown(self.method)}.")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "beam_width", _whole_number(self.beam_width, "Beam width", *BEAM_WIDTHS))
        if self.max_new_tokens is not None:
            object.__setattr__(self, "max_new_tokens", _whole_number(self.max_new_tokens, "Max new tokens", 1, MAX_NEW_TOKENS))
        object.__setattr__(self, "length_penalty", _number(self.length_penalty, "Length penalty", *LENGTH_PENALTIES))
        if not isinstance(self.prefix, str):
            raise ValueError(f"The caption's start must be text, not {_shown(self.prefix)}.")
        if len(self.prefix) > MAX_PREFIX_CHARS or len(normalize_caption(self.prefix)) > MAX_PREFIX_WORDS:
            raise ValueError(f"The caption's start may have at most {MAX_PREFIX_WORDS} words ({MAX_PREFIX_CHARS} characters).")
        size = _whole_number(self.no_repeat_ngram_size, "No-repeat n-gram size", 0, NO_REPEAT_NGRAM_SIZES[-1])
        if size not in NO_REPEAT_NGRAM_SIZES:
            raise ValueError(f"No-repeat n-gram size must be one of {', '.join(map(str, NO_REPEAT_NGRAM_SIZES))}, not {size}.")
        object.__setattr__(self, "no_repeat_ngram_size", size)
        object.__setattr__(self, "temperature", _number(self.temperature, "Temperature", *TEMPERATURES))
        top_p = _number(self.top_p, "Top-p", 0.0, 1.0)
        if top_p == 0:
            raise ValueError("Top-p must be more than 0 (and at most 1): sampling needs at least one word to draw from.")
        object.__setattr__(self, "top_p", top_p)
        if self.seed is not None:
            object.__setattr__(self, "seed", _whole_number(self.seed, "Seed", 0, MAX_SEED))
        for name in ("repeat_words", "name_objects"):
            value = getattr(self, name)
            if value not in (True, False):  # (0 and 1 are equal to False and True)
                raise ValueError(f"{name.replace('_', ' ').capitalize()} must be true or false, not {_shown(value)}.")
            object.__setattr__(self, name, bool(value))


def _shown(value, limit: int = 40) -> str:
    """A request's value as echoed in an error: short, one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {_shown(value)}.") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be between {_bound(low)} and {_bound(high)}, not {_shown(value)}.")
    return number


def _whole_number(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, not {_shown(value)}.")
    number = _number(value, name, low, high)
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, not {_shown(value)}.")
    return int(number)


def _bound(number: float) -> str:
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def prefix_ids(vocab: Vocabulary, prefix: str) -> tuple[int, ...]:
    """The prompt's words -> token ids; words the model doesn't know are refused, by name."""
    words = normalize_caption(prefix)
    unknown = list(dict.fromkeys(w for w in words if w not in vocab.stoi or vocab.stoi[w] in vocab.forbidden_ids))
    if unknown:
        listed = ", ".join(f"'{w}'" for w in unknown)
        raise ValueError(f"The model doesn't know the word{'s' if len(unknown) > 1 else ''} {listed}: start the caption with other words.")
    return tuple(vocab.stoi[w] for w in words)


def limit_blas_threads() -> None:
    """Make NumPy's BLAS single-threaded, for the whole process: the entry points (app, CLI, batch job,
    training, benchmarks) call it once.

    The step model multiplies a few rows (the beams) by 256-row matrices. Spreading such small products
    over threads costs more than it saves, and next to TensorFlow's own threads (the encoder, another
    request's encoder) BLAS threads oversubscribe the CPU: on 2 busy cores, beam search of width 5 took
    ~300 ms per caption with OpenBLAS' default threads and ~10 ms single-threaded (benchmarks/speed.py).
    TensorFlow doesn't use NumPy's BLAS, so the encoder is unaffected.
    """
    threadpool_limits(1, user_api="blas")


# ---- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # the caption's tokens (the prefix's included), without <start>, ending with <end> if finished
    log_prob: float  # the sum of its tokens' log-probabilities
    score: float  # what its decoder ranked it by: beam search, log_prob with the length penalty; the others, log_prob


@dataclass(frozen=True)
class Caption:
    text: str
    candidates: list[tuple[str, float]]  # (caption, total log-probability), best first
    scores: list[float] = dataclasses.field(default_factory=list)  # what decoding ranked them by (beam: with the length penalty)
    # What the encoder's ImageNet classifier sees: its likeliest classes, (readable name, probability), best first
    # (empty for weights folders without the classifier).
    objects: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    # Whether the photo is like those the model learned from, so that its caption can be trusted, and the score
    # that says so (visual.Familiarity; below the folder's threshold: False, as when the caption names a thing the
    # classifier reliably sees but doesn't see here: a dog on a photo of coffee). None: the folder can't tell.
    familiar: bool | None = None
    familiarity: float | None = None

    @classmethod
    def from_hypotheses(cls, vocab: Vocabulary, hypotheses: list[Hypothesis], **described) -> Caption:
        """One image's hypotheses (best first) -> its Caption. described: objects, familiar, familiarity."""
        candidates = [(vocab.decode(h.tokens), h.log_prob) for h in hypotheses]
        return cls(candidates[0][0], candidates, [h.score for h in hypotheses], **described)


def mean_token_log_prob(hypothesis: Hypothesis) -> float:
    """A caption's log-probability per token (<end> included when it ended): how sure the model was of it."""
    return hypothesis.log_prob / max(len(hypothesis.tokens), 1)


def length_normalised(log_prob: float, length: int, alpha: float) -> float:
    """GNMT's length penalty (Wu et al. 2016): log_prob / ((5 + length) / 6) ** alpha."""
    return log_prob / ((5.0 + length) / 6.0) ** alpha if alpha else log_prob


# ---- logit filters ---------------------------------------------------------------------------------


class LogitFilter:
    """A rule on the next token, beyond the vocabulary's: which tokens a caption may not continue with.

    `apply` sets those tokens' log-probabilities to -inf in place and leaves the others as they are (not
    renormalised), so that a caption's log-probability stays the model's: the one the candidates table
    shows and explain.py gives its words. (A rule that a caption must include given words would be another.)
    """

    def apply(self, log_probs: np.ndarray, captions: np.ndarray) -> None:
        """log_probs: (rows, vocab), one row per live caption; captions: (rows, length) their tokens so far,
        the prefix's included."""
        raise NotImplementedError


class NoRepeatNgram(LogitFilter):
    """No n-gram appears twice in a caption: the tokens that would repeat one get zero probability."""

    def __init__(self, n: int):
        self.n = n

    def apply(self, log_probs: np.ndarray, captions: np.ndarray) -> None:
        n = self.n
        captions = np.asarray(captions)
        if captions.shape[1] < n:
            return
        ending = captions[:, captions.shape[1] - n + 1 :]  # the last n - 1 tokens: an n-gram's first n - 1
        earlier = np.lib.stride_tricks.sliding_window_view(captions[:, :-1], n - 1, axis=1)  # each earlier (n-1)-gram
        rows, starts = np.nonzero((earlier == ending[:, None, :]).all(axis=2))
        log_probs[rows, captions[rows, starts + n - 1]] = -np.inf  # the token that followed it then


class NoRepeatedWords(LogitFilter):
    """No word but a function word appears twice in a caption, and none right after itself: the words a caption
    already has get zero probability, unless they are "a", "on", "the" and the like (vocabulary.FUNCTION_WORDS), and
    so does its last word ("a man is on a on on a ramp" otherwise)."""

    def __init__(self, once_only: np.ndarray):
        """once_only: (vocab,) bool over the task's words (Vocabulary.once_only_ids)."""
        self.once_only = once_only

    def apply(self, log_probs: np.ndarray, captions: np.ndarray) -> None:
        captions = np.asarray(captions)
        rows, positions = np.nonzero(self.once_only[captions])
        log_probs[rows, captions[rows, positions]] = -np.inf
        if captions.shape[1]:
            log_probs[np.arange(len(captions)), captions[:, -1]] = -np.inf


class NoCutOffEnding(LogitFilter):
    """No caption ends mid-phrase: <end> gets zero probability right after a word that (almost) never ends a
    training caption ("a", "the", "on": Vocabulary.never_final), so "sitting on a bench in a" goes on or loses to
    "sitting on a bench". Folders written before the rule have no such words: nothing is forbidden."""

    def __init__(self, never_final: np.ndarray, end_id: int):
        """never_final: (vocab,) bool over the task's words (Vocabulary.never_final_ids)."""
        self.never_final, self.end_id = never_final, end_id

    def apply(self, log_probs: np.ndarray, captions: np.ndarray) -> None:
        captions = np.asarray(captions)
        if captions.shape[1]:
            log_probs[self.never_final[captions[:, -1]], self.end_id] = -np.inf


# ---- the task: one decoding setting for one model ---------------------------------------------------


@dataclass(frozen=True)
class Naming:
    """What `name_objects` needs beside the model: the classes' caption words (visual.VisualWords), and the
    vocabulary and network grown by the words the vocabulary lacks (their ids follow its own)."""

    visual_words: VisualWords
    vocab: Vocabulary
    model: StepModel

    @classmethod
    def grown(cls, model: StepModel, vocab: Vocabulary, visual_words: VisualWords) -> Naming:
        return cls(visual_words, Vocabulary([*vocab.itos[len(SPECIAL_TOKENS) :], *visual_words.new_words], vocab.never_final),
                   model.with_new_words(visual_words.new_embeddings, visual_words.new_output_kernel,
                                        visual_words.new_output_bias))


class DecodingTask:
    """`DecodingOptions` resolved for one model, once per request: the prefix's tokens (unknown words are
    refused here, by name), the step budget, the logit filters and the decoder. `run` decodes any number of
    images with them."""

    def __init__(self, model: StepModel, vocab: Vocabulary, options: DecodingOptions, max_new_tokens: int,
                 naming: Naming | None = None):
        """max_new_tokens: the model's step budget (ModelConfig.max_new_tokens), used where options.max_new_tokens is None.
        naming: the folder's visual words, for options.name_objects (None: the option does nothing)."""
        self.model, self.vocab, self.options = model, vocab, options
        self.prefix_tokens = prefix_ids(vocab, options.prefix)
        self.max_new_tokens = options.max_new_tokens or max_new_tokens
        self.decoder_class = DECODERS[options.method]
        self.naming = naming if options.name_objects and options.method != "sample" else None
        self.logit_filters: list[LogitFilter] = []
        if options.no_repeat_ngram_size:
            self.logit_filters.append(NoRepeatNgram(options.no_repeat_ngram_size))
        if not options.repeat_words:
            self.logit_filters.append(NoRepeatedWords(self.words.once_only_ids))
        if self.words.never_final:
            self.logit_filters.append(NoCutOffEnding(self.words.never_final_ids, vocab.end_id))
        # The vocabulary's rule as what the logits are offset by: 0 where a token is allowed, -inf where not
        # (for the grown vocabulary as well, where the decoder forbids the new words an image doesn't need).
        self._token_masks = {(len(v), first): np.where(v.allowed_tokens(first), 0.0, -np.inf).astype(np.float32)
                             for v in [vocab, *([self.naming.vocab] if self.naming else [])] for first in (True, False)}

    @property
    def words(self) -> Vocabulary:
        """The vocabulary the captions' tokens are read with (the grown one when objects are named)."""
        return self.naming.vocab if self.naming else self.vocab

    def run(self, features: np.ndarray, rng: np.random.Generator | None = None, samples_per_image: int = 1,
            class_probabilities: np.ndarray | None = None) -> list[list[Hypothesis]]:
        """(n, feature_dim) image features -> each image's hypotheses: best first, or the samples as drawn.

        rng, samples_per_image: sampling only. rng: draw every caption from this generator (self-critical
        training's, so that a run reproduces); None: from the options' seed. samples_per_image: captions drawn
        per image. class_probabilities: (n, classes) the encoder's ImageNet classifier's, for name_objects.
        """
        if samples_per_image != 1 and self.options.method != "sample":
            raise ValueError("Only sampling draws several captions per image.")
        required = (self.naming.visual_words.required(class_probabilities)
                    if self.naming and class_probabilities is not None else [()] * len(features))
        named = [i for i, groups in enumerate(required) if groups]
        if not named:
            return self._decode(self.decoder_class(self, len(features), samples_per_image, rng), self.model, features)
        plain = [i for i, groups in enumerate(required) if not groups]
        hypotheses: list[list[Hypothesis] | None] = [None] * len(features)
        if plain:  # decoded as without the option
            for i, found in zip(plain, self._decode(self.decoder_class(self, len(plain)), self.model, features[plain])):
                hypotheses[i] = found
        decoder = ConstrainedBeamSearchDecoder(self, [required[i] for i in named])
        for i, found in zip(named, self._decode(decoder, self.naming.model, features[named])):
            hypotheses[i] = found
        unnamed = [i for i in named if not hypotheses[i]]  # no caption could name them (every word forbidden)
        if unnamed:
            for i, found in zip(unnamed, self._decode(self.decoder_class(self, len(unnamed)), self.model, features[unnamed])):
                hypotheses[i] = found
        return hypotheses  # type: ignore[return-value]

    def _decode(self, decoder: TokenDecoder, model: StepModel, features: np.ndarray) -> list[list[Hypothesis]]:
        """The one decoding loop: the network reads each live caption's last token, the decoder chooses the next."""
        image = model.project_image(features)
        state, logits, prefix_log_probs = self._start(model, image if decoder.images is None else image[decoder.images], decoder)
        decoder.start(prefix_log_probs)
        for step in range(self.max_new_tokens):
            if step:
                logits, state = model.step(image if decoder.images is None else image[decoder.images], decoder.tokens, state)
            going = decoder.update(self.log_probs(logits, step, decoder), step)
            if decoder.done:
                break
            if going is not None:
                state = model.select_rows(state, going)
        return decoder.finalize()

    def log_probs(self, logits: np.ndarray, step: int, decoder: TokenDecoder) -> np.ndarray:
        """The next token's log-probabilities (rows, vocab) at `step` (0: the first after the prefix): the model's,
        over the tokens the vocabulary (and the decoder, if any) allows there, with each logit filter's tokens forbidden."""
        offsets = decoder.token_offsets() if decoder is not None else None
        log_probs = self._allowed_log_probs(logits, not self.prefix_tokens and step == 0, offsets)
        if self.logit_filters and decoder is not None:  # (without a decoder, no caption has tokens yet)
            captions = decoder.captions()
            for logit_filter in self.logit_filters:
                logit_filter.apply(log_probs, captions)
        return log_probs

    def _allowed_log_probs(self, logits: np.ndarray, first: bool, offsets: np.ndarray | None = None) -> np.ndarray:
        """Log-softmax over the tokens a caption may contain (`first`: as its first token; offsets: (rows, vocab)
        the decoder's own, -inf for the tokens it forbids a row)."""
        log_probs = logits + self._token_masks[logits.shape[1], first]  # a new array, -inf where not allowed
        if offsets is not None:
            log_probs += offsets
        log_probs -= log_probs.max(axis=-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
        return log_probs

    def _start(self, model: StepModel, image: np.ndarray, decoder: TokenDecoder):
        """Feed <start> and the prefix to every row: -> (state, logits after the last one, the prefix's log-prob)."""
        n = len(image)
        state = model.initial_state(n)
        logits, state = model.step(image, np.full(n, self.vocab.start_id), state)
        log_prob = np.zeros(n)
        for position, token in enumerate(self.prefix_tokens):
            log_prob += self._allowed_log_probs(logits, position == 0, decoder.token_offsets())[:, token]
            logits, state = model.step(image, np.full(n, token), state)
        return state, logits, log_prob


# ---- decoders ------------------------------------------------------------------------------------


class TokenDecoder:
    """How the next tokens are chosen. `DecodingTask.run` makes one for each batch of images and drives it:

        the network reads  tokens     (rows,) each live caption's last token
                           images     (rows,) each live caption's image; None: every row shows the batch's one image
        the filters read   captions() (rows, length) the live captions so far, the prefix's tokens included
        start(prefix_log_probs)       the rows after <start> and the prefix, and the prefix's log-probability
        update(log_probs, step)       choose each live caption's next token; -> which rows go on, in order, for the
                                      task to keep their network state (None: all of them); sets `done` at the end
        finalize()                    -> each image's hypotheses

    Beside its batch bookkeeping, each decoder has a path for one image alone (the app's case) that gives the
    same tokens with fewer NumPy calls a step; `one_image_path = False` turns it off (python -m benchmarks.decoding
    measures what it saves).
    """

    one_image_path = True
    tokens: np.ndarray
    images: np.ndarray | None
    done = False

    def __init__(self, task: DecodingTask, images: int, samples_per_image: int = 1, rng: np.random.Generator | None = None):
        self.task, self.end = task, task.vocab.end_id

    def start(self, prefix_log_probs: np.ndarray) -> None:
        raise NotImplementedError

    def token_offsets(self) -> np.ndarray | None:
        """(rows, vocab) added to each live caption's logits before the softmax, -inf for the tokens this decoder
        forbids it beyond the vocabulary's rule; None: none."""
        return None

    def captions(self) -> np.ndarray:
        raise NotImplementedError

    def update(self, log_probs: np.ndarray, step: int) -> np.ndarray | list[int] | None:
        raise NotImplementedError

    def finalize(self) -> list[list[Hypothesis]]:
        raise NotImplementedError


class GreedyDecoder(TokenDecoder):
    """The most likely next token at each step. A caption leaves the batch once it has ended."""

    def __init__(self, task: DecodingTask, images: int, samples_per_image: int = 1, rng: np.random.Generator | None = None):
        super().__init__(task, images)
        self.samples_per_image = samples_per_image
        self.rows = np.arange(images * samples_per_image)  # the live captions, image-major
        self.alone = len(self.rows) == 1 and self.one_image_path
        self.images = None if self.alone else self._image_of(self.rows)

    def choose(self, log_probs: np.ndarray) -> np.ndarray:
        """(rows, vocab) -> each live caption's next token."""
        return log_probs.argmax(axis=-1)

    def start(self, prefix_log_probs: np.ndarray) -> None:
        prefix = self.task.prefix_tokens
        if self.alone:
            self.caption, self.log_prob = list(prefix), float(prefix_log_probs[0])
            return
        self.sum_log_probs = prefix_log_probs
        self.so_far = np.empty((len(self.rows), len(prefix) + self.task.max_new_tokens), np.int64)
        self.so_far[:, : len(prefix)] = prefix
        self.lengths = np.full(len(self.rows), self.so_far.shape[1])
        self.length = len(prefix)  # tokens so far

    def captions(self) -> np.ndarray:
        return np.array([self.caption], np.int64) if self.alone else self.so_far[self.rows, : self.length]

    def update(self, log_probs: np.ndarray, step: int) -> np.ndarray | None:
        if self.alone:  # about 10 NumPy calls a step, without the batch's bookkeeping of which rows go on
            token = int(self.choose(log_probs)[0])
            self.log_prob += float(log_probs[0, token])
            self.caption.append(token)
            self.tokens, self.done = np.array([token]), token == self.end
            return None
        rows = self.rows
        tokens = self.choose(log_probs)
        self.sum_log_probs[rows] += log_probs[np.arange(len(rows)), tokens]
        self.so_far[rows, self.length] = tokens
        self.length += 1
        ended = tokens == self.end
        if not ended.any():
            self.tokens = tokens
            return None
        self.lengths[rows[ended]] = self.length
        going = np.flatnonzero(~ended)
        self.rows, self.tokens = rows[going], tokens[going]
        self.images, self.done = self._image_of(self.rows), not going.size
        return going

    def finalize(self) -> list[list[Hypothesis]]:
        if self.alone:
            return [[Hypothesis(tuple(self.caption), self.log_prob, self.log_prob)]]
        hypotheses = [Hypothesis(tuple(self.so_far[i, : self.lengths[i]].tolist()), float(log_prob), float(log_prob))
                      for i, log_prob in enumerate(self.sum_log_probs)]
        k = self.samples_per_image
        return [hypotheses[i : i + k] for i in range(0, len(hypotheses), k)]

    def _image_of(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.samples_per_image == 1 else rows // self.samples_per_image


class SamplingDecoder(GreedyDecoder):
    """Nucleus sampling: each next token drawn at random from the model's probabilities raised to 1 / temperature,
    among the likeliest tokens that together hold `top_p` of them. Greedy's bookkeeping, another choice."""

    def __init__(self, task: DecodingTask, images: int, samples_per_image: int = 1, rng: np.random.Generator | None = None):
        super().__init__(task, images, samples_per_image)
        self.temperature, self.top_p, seed = task.options.temperature, task.options.top_p, task.options.seed
        self.rng, self.streams = rng, None
        if rng is None and seed is not None:
            # Each caption draws from its own stream, seeded by the seed and which of its image's samples it is:
            # an image's caption then doesn't depend on the images decoded with it (a batch job resumed, on Ray).
            self.streams = [np.random.default_rng([seed, row % samples_per_image]) for row in self.rows]
        elif rng is None:
            self.rng = np.random.default_rng()

    def choose(self, log_probs: np.ndarray) -> np.ndarray:
        probs = np.exp(log_probs.astype(np.float64) / self.temperature)  # not normalised: the draw scales to the total
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        # Inverse-CDF sampling: the first token whose cumulative probability reaches u * total, u in (0, 1].
        # A forbidden token (probability 0) adds nothing to the sum, so it can never be the first to reach it.
        cumulative = np.cumsum(probs, axis=1)
        threshold = (1.0 - self._uniforms())[:, None] * cumulative[:, -1:]
        return (cumulative < threshold).sum(axis=1)

    def _uniforms(self) -> np.ndarray:
        """One draw in [0, 1) per live caption."""
        if self.streams is None:
            return self.rng.random(len(self.rows))
        return np.array([self.streams[row].random() for row in self.rows])


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """(rows, vocab) probabilities, not necessarily normalised -> the same with 0 outside each row's nucleus: its
    likeliest tokens, fewest first, until they hold top_p of the row's total (the likeliest is always kept)."""
    order = np.argsort(-probs, axis=1, kind="stable")  # ties: the lower token first, as argmax picks
    ranked = np.take_along_axis(probs, order, axis=1)
    mass_before = np.cumsum(ranked, axis=1) - ranked
    outside = np.empty(probs.shape, bool)
    np.put_along_axis(outside, order, mass_before >= top_p * ranked.sum(axis=1, keepdims=True), axis=1)
    return np.where(outside, 0.0, probs)


class BeamSearchDecoder(TokenDecoder):
    """Keeps the `beam_width` best unfinished captions per image; a caption that picks <end> moves to that image's
    finished list. An image is done once it has `beam_width` finished captions (or at the token budget, where its
    live beams count as finished). Finalized: up to `beam_width` distinct captions per image, ranked by the
    length-normalised score.

    Every step chooses for all images at once, with array operations: each image's candidates (its beams x the
    vocabulary) form one row of a matrix, and each row is walked in score order the same way: endings join the
    finished list while it has room, until `beam_width` captions go on. One image alone walks its 2k best
    candidates in plain Python instead (a few microseconds, against about 40 NumPy calls a step).
    """

    def __init__(self, task: DecodingTask, images: int, samples_per_image: int = 1, rng: np.random.Generator | None = None):
        super().__init__(task, images)
        self.k, self.image_count = task.options.beam_width, images
        self.alone = images == 1 and self.one_image_path
        # Live beams of all images, flattened and grouped by image: row r belongs to image images[r].
        self.images = None if self.alone else np.arange(images)

    def start(self, prefix_log_probs: np.ndarray) -> None:
        prefix, n, k = self.task.prefix_tokens, self.image_count, self.k
        self.scores = prefix_log_probs
        if self.alone:
            self.beams: list[tuple[int, ...]] = [prefix]  # the live beams' tokens so far
            self.finished: list[tuple[tuple[int, ...], float]] = []  # (tokens, log-prob) in the order they finished
            return
        self.so_far = np.tile(np.array(prefix, np.int64), (n, 1))  # (rows, tokens so far)
        # Each image's finished captions, in the order they finished.
        self.finished_tokens = np.full((n, k, len(prefix) + self.task.max_new_tokens), self.end)
        self.finished_lengths = np.zeros((n, k), np.int64)
        self.finished_scores = np.zeros((n, k))
        self.finished_count = np.zeros(n, np.int64)

    def captions(self) -> np.ndarray:
        return np.array(self.beams, np.int64) if self.alone else self.so_far

    def update(self, log_probs: np.ndarray, step: int) -> np.ndarray | list[int] | None:
        last_step = step == self.task.max_new_tokens - 1  # at the budget every caption ends
        if self.alone:
            return self._update_one_image(log_probs, last_step)
        n, k, end, vocab_size = self.image_count, self.k, self.end, log_probs.shape[1]
        candidate_scores = self.scores[:, None] + log_probs

        # One row per image with live beams: its beams' candidates side by side (-inf where it has fewer beams).
        beams = np.bincount(self.images, minlength=n)
        live_images = np.flatnonzero(beams)
        beams = beams[live_images]
        starts = np.cumsum(beams) - beams  # each image's first row
        if len(self.images) == len(live_images) * beams.max():  # every image has as many beams: a reshape
            per_image = candidate_scores.reshape(len(live_images), -1)
        else:
            per_image = np.full((len(live_images), beams.max(), vocab_size), -np.inf)
            beam = np.arange(len(self.images)) - np.repeat(starts, beams)
            per_image[np.repeat(np.arange(len(live_images)), beams), beam] = candidate_scores
            per_image = per_image.reshape(len(live_images), -1)
        top, top_scores = _best_candidates(per_image, 2 * k)  # enough that k go on even if k others end here
        rows, tokens = starts[:, None] + top // vocab_size, top % vocab_size

        # The walk down each row: stop at the first impossible candidate or once k captions go on.
        possible = np.isfinite(top_scores)
        ends = (tokens == end) | last_step
        goes_on = possible & ~ends
        considered = possible & (np.cumsum(goes_on, axis=1) - goes_on < k)
        ending = considered & ends
        end_rank = np.cumsum(ending, axis=1)  # 1, 2, ... among the row's endings
        ending &= end_rank <= (k - self.finished_count[live_images])[:, None]  # only while the finished list has room

        i, j = np.nonzero(ending)
        if i.size:
            image_of, slot, row = live_images[i], self.finished_count[live_images[i]] + end_rank[i, j] - 1, rows[i, j]
            length = self.so_far.shape[1] + 1
            self.finished_tokens[image_of, slot, : length - 1] = self.so_far[row]
            self.finished_tokens[image_of, slot, length - 1] = tokens[i, j]
            self.finished_lengths[image_of, slot] = length
            self.finished_scores[image_of, slot] = top_scores[i, j]
            self.finished_count[live_images] += ending.sum(axis=1)

        i, j = np.nonzero(considered & goes_on)
        still_open = self.finished_count[live_images[i]] < k  # an image with k finished captions is done
        i, j = i[still_open], j[still_open]
        if not i.size:
            self.done = True
            return None
        row = rows[i, j]
        self.tokens = tokens[i, j]
        self.so_far = np.concatenate([self.so_far[row], self.tokens[:, None]], axis=1)
        self.images, self.scores = live_images[i], top_scores[i, j]
        return row

    def _update_one_image(self, log_probs: np.ndarray, last_step: bool) -> list[int] | None:
        """`update` for one image: the same choices, walking its 2k best candidates in Python."""
        k, end, vocab_size = self.k, self.end, log_probs.shape[1]
        candidate_scores = (self.scores[:, None] + log_probs).reshape(1, -1)
        top, top_scores = _best_candidates(candidate_scores, 2 * k)
        rows, tokens, scores = [], [], []
        for candidate, score in zip(top[0].tolist(), top_scores[0].tolist()):
            if not math.isfinite(score):
                break
            row, token = divmod(candidate, vocab_size)
            if token == end or last_step:
                if len(self.finished) < k:
                    self.finished.append((self.beams[row] + (token,), score))
            else:
                rows.append(row)
                tokens.append(token)
                scores.append(score)
                if len(rows) == k:  # only endings that outrank the k-th live caption count
                    break
        if len(self.finished) == k or not rows:
            self.done = True
            return None
        self.beams = [self.beams[row] + (token,) for row, token in zip(rows, tokens)]
        self.tokens, self.scores = np.array(tokens), np.array(scores)
        return rows

    def finalize(self) -> list[list[Hypothesis]]:
        if self.alone:
            per_image = [self.finished]
        else:
            per_image = [[(tuple(self.finished_tokens[i, s, : self.finished_lengths[i, s]].tolist()), float(self.finished_scores[i, s]))
                          for s in range(self.finished_count[i])] for i in range(self.image_count)]
        alpha = self.task.options.length_penalty
        return [sorted((Hypothesis(tokens, log_prob, length_normalised(log_prob, len(tokens), alpha)) for tokens, log_prob in finished),
                       key=lambda hypothesis: hypothesis.score, reverse=True)
                for finished in per_image]


class ConstrainedBeamSearchDecoder(TokenDecoder):
    """Beam search whose captions must each contain one word of every group given for their image (Anderson et
    al. 2017, "Guided open vocabulary image captioning with constrained beam search").

    An image's captions are kept apart by the set of groups they have named so far (the states of a finite-state
    machine: with c groups, 2^c of them), each set with its own beam of `beam_width`: a caption that takes a word
    of a group it lacks moves to the set with that group added. Every step, each set's beam is filled as beam
    search fills one, from the captions already in it (with any word but a group's new one) and those in a smaller
    set that take the word that completes it. A caption ends in the set it is in; the image is done once the set
    with every group holds `beam_width` finished captions, and its hypotheses are those (with the length penalty,
    as beam search ranks them), or, if none names every group within the token budget, those of the fullest set.

    Greedy decoding with name_objects is this search with one caption per set. The new words of the grown
    vocabulary are offered only to the images that require them. Each step takes every caption's 2k best
    candidates (and as many more as its image has group words) in one NumPy call on its log-probabilities, then
    fills the sets in plain Python from those and the arriving ones (a few dozen per set): filling each set from
    its captions' whole vocabulary cost about twice as much a step (tests/reference_decoding.py writes that search
    out; tests/test_visual.py checks that both agree).
    """

    def __init__(self, task: DecodingTask, required: list[tuple[tuple[int, ...], ...]]):
        super().__init__(task, len(required))
        self.k = task.options.beam_width if task.options.method == "beam" else 1
        self.required = required
        vocab_size = len(task.naming.vocab)
        new_words = np.arange(len(task.vocab), vocab_size)
        # Per image: which groups each of its group words completes (a bit per group; as a table over the vocabulary
        # too), and its offsets: -inf for the new words it doesn't require.
        self.word_bits: list[dict[int, int]] = []
        self.bits_table = np.zeros((len(required), vocab_size), np.int32)
        self.image_offsets = np.zeros((len(required), vocab_size), np.float32)
        for image, groups in enumerate(required):
            bits: dict[int, int] = {}
            for g, group in enumerate(groups):
                for token in group:
                    bits[token] = bits.get(token, 0) | 1 << g
            self.word_bits.append(bits)
            self.bits_table[image, list(bits)] = list(bits.values())
            self.image_offsets[image, new_words] = -np.inf
            self.image_offsets[image, [t for t in bits if t >= len(task.vocab)]] = 0.0
        self.most_group_words = max(map(len, self.word_bits), default=0)
        self.images = np.arange(len(required))  # each live caption's image
        self.sets = np.array([self._named(i, task.prefix_tokens) for i in range(len(required))])  # its groups named
        self.beams: list[tuple[int, ...]] = [tuple(task.prefix_tokens)] * len(required)
        # Per image, per set of groups: the finished captions (tokens, log-prob) in the order they finished.
        self.finished = [[[] for _ in range(1 << len(groups))] for groups in required]
        self.started = False  # the prefix (if any) is read first, without token_offsets' rule on repeated words

    def _named(self, image: int, tokens) -> int:
        named = 0
        for token in tokens:
            named |= self.word_bits[image].get(token, 0)
        return named

    def start(self, prefix_log_probs: np.ndarray) -> None:
        self.scores = np.asarray(prefix_log_probs, np.float64)
        self.started = True

    def token_offsets(self) -> np.ndarray:
        offsets = self.image_offsets[self.images]
        # No word follows itself: 3 of Flickr8k's 30,000 training captions do so ("ring ring"), but a caption pulled
        # towards a word it must name stutters ("a skier is is flying") without this rule.
        last = [(row, beam[-1]) for row, beam in enumerate(self.beams) if beam] if self.started else []
        if last:
            rows, tokens = zip(*last)
            offsets[list(rows), list(tokens)] = -np.inf
        return offsets

    def captions(self) -> np.ndarray:
        return np.array(self.beams, np.int64)

    def update(self, log_probs: np.ndarray, step: int) -> list[int] | None:
        last_step = step == self.task.max_new_tokens - 1  # at the budget every caption ends
        k, end = self.k, self.end
        # Each caption's best candidates, all rows at once: its 2k likeliest words (one caption, one score: the
        # same order), and as many more as its image has group words, since a word naming a group the caption lacks
        # would move it to another set (-inf here: it arrives there below). A set's 2k best staying candidates
        # are among its captions' own; the sets are then filled in plain Python, from a few dozen candidates each.
        count = min(2 * k + self.most_group_words, log_probs.shape[1])
        top = np.argpartition(log_probs, log_probs.shape[1] - count, axis=1)[:, -count:]
        top_scores = self.scores[:, None] + log_probs[np.arange(len(top))[:, None], top]  # (take_along_axis: slower)
        top_scores[(self.bits_table[self.images[:, None], top] & ~self.sets[:, None]) != 0] = -np.inf
        top_scores, top, sets, scores = top_scores.tolist(), top.tolist(), self.sets.tolist(), self.scores.tolist()
        rows_of: dict[int, list[int]] = {}  # each image's live captions
        for row, image in enumerate(self.images.tolist()):
            rows_of.setdefault(image, []).append(row)
        rows, tokens, new_scores, new_sets = [], [], [], []
        for image, image_rows in rows_of.items():
            full = (1 << len(self.required[image])) - 1
            if len(self.finished[image][full]) >= k:
                continue
            walks: list[list[tuple[float, int, int]]] = [[] for _ in range(full + 1)]
            for row in image_rows:
                have = sets[row]
                walks[have] += zip(top_scores[row], [row] * count, top[row])  # staying in its set
                for token, bits in self.word_bits[image].items():  # arriving in a larger set: naming another group
                    if have | bits != have:
                        walks[have | bits].append((scores[row] + float(log_probs[row, token]), row, token))
            for named, walk in enumerate(walks):
                walk.sort(key=itemgetter(0), reverse=True)  # best first; equal scores stay in order
                going = 0
                for score, row, token in walk:
                    if not math.isfinite(score):
                        break
                    if token == end or last_step:
                        if len(self.finished[image][named]) < k:
                            self.finished[image][named].append((self.beams[row] + (token,), score))
                    else:
                        rows.append(row)
                        tokens.append(token)
                        new_scores.append(score)
                        new_sets.append(named)
                        going += 1
                        if going == k:
                            break
        if not rows:
            self.done = True
            return None
        self.beams = [self.beams[row] + (token,) for row, token in zip(rows, tokens)]
        self.tokens, self.scores = np.array(tokens), np.array(new_scores)
        self.images, self.sets = self.images[rows], np.array(new_sets)
        return rows

    def finalize(self) -> list[list[Hypothesis]]:
        alpha, result = self.task.options.length_penalty if self.k > 1 else 0.0, []
        for finished in self.finished:
            # The set with every group; if no caption named them all, the fullest set that has captions.
            best = next(f for f in sorted(range(len(finished)), key=lambda named: (named == len(finished) - 1, bin(named).count("1")),
                                          reverse=True) if finished[f] or f == 0)
            result.append(sorted((Hypothesis(tokens, log_prob, length_normalised(log_prob, len(tokens), alpha))
                                  for tokens, log_prob in finished[best]), key=lambda h: h.score, reverse=True))
        return result


def _best_candidates(per_image: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, candidates) scores -> each row's `count` best (their indices, their scores), best first."""
    first_of_top = max(per_image.shape[1] - count, 0)
    top = np.argpartition(per_image, first_of_top, axis=1)[:, first_of_top:]
    image_row = np.arange(len(per_image))[:, None]
    top = top[image_row, np.argsort(-per_image[image_row, top], axis=1, kind="stable")]
    return top, per_image[image_row, top]


DECODERS: dict[str, type[TokenDecoder]] = {"greedy": GreedyDecoder, "beam": BeamSearchDecoder, "sample": SamplingDecoder}
