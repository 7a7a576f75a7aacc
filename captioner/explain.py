"""Where the model looked for each word: closed-form Grad-CAM for the merge model.

In the merge model the image enters the decoder in one place only: the pooled feature vector f, the
global average of the encoder's last feature map A (h x w x C). The LSTM never sees the image, so its
output h_t depends on the words alone, and the word at step t comes out of

    x = relu(W_i f + b_i)                 image_dense (dropout is off at inference)
    u = W_d (x + h_t) + b_d,  z = relu(u)  merge, decoder_dense
    log p = log_softmax(W_o z + b_o)       next_word

so the gradient of the word's log-probability with respect to f is exact and cheap, with no gradient tape:

    d log p_w / d logits = onehot(w) - p
    d / d z  = W_o (onehot(w) - p)
    d / d x  = W_d (d/dz * [u > 0])          (the add passes the gradient through to x unchanged)
    d / d f  = W_i (d/dx * [x > 0])

a few (words x 256) matrix products for the whole caption. Because f_k = mean_ij A_k(i, j), the gradient
with respect to each cell of the map is d log p / d f_k / (h w), so Grad-CAM's channel weights are
proportional to d log p / d f, and the word's heatmap is

    ReLU( sum_k d log p_w / d f_k * A_k(i, j) )

normalised to a maximum of 1. (Before the ReLU its average over the cells is d log p_w / d f . f, the
first-order term of log p_w in f: each cell's share of what the image contributed to the word.)

The probabilities are the ones decoding uses: the model's softmax with the tokens a caption never
contains (padding, start, unknown; the end token as the first word) left out and the rest renormalised
(`Vocabulary.allowed_tokens`), and the gradient is that distribution's. The network is model.StepModel's:
its LSTM gives the hidden states, its weights the backward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .decoding import Caption, Hypothesis
from .model import StepModel
from .vocabulary import FUNCTION_WORDS, Vocabulary, normalize_caption

# Overlays are drawn on a copy of the photo at most this many pixels on its longer side: enough for a
# page or a file, and it bounds the time and memory of drawing them whatever size the upload was.
OVERLAY_MAX_SIDE = 768
OVERLAY_OPACITY = 0.7  # of the colour at the hottest cell; cold cells show the photo as it is
OVERLAY_JPEG_QUALITY = 90
# A caption given to explain is read back word by word: as long as the longest caption decoding may write.
MAX_CAPTION_WORDS, MAX_CAPTION_CHARS = 100, 1000
HEATMAP_FLOOR = 1e-12  # a word whose map has no positive cell (nothing in the image raised it) gets all zeros

# A perceptually ordered colour ramp (black-purple-red-orange-yellow, like matplotlib's "inferno"),
# as control points interpolated in NumPy: no plotting library needed to draw an overlay.
_RAMP_STOPS = np.array([0.0, 0.15, 0.35, 0.55, 0.75, 0.9, 1.0])
_RAMP_COLOURS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [252, 255, 164]],
    dtype=np.float32,
)
_RAMP_TABLE = np.stack(  # the ramp as a 256-colour palette: overlays look each pixel's colour up in it
    [np.interp(np.linspace(0.0, 1.0, 256), _RAMP_STOPS, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1
).round().astype(np.uint8)


@dataclass(frozen=True)
class WordExplanation:
    word: str
    probability: float  # p(word | the image and the words before it), as decoding sees it
    heatmap: np.ndarray  # (h, w) on the encoder's feature-map grid, 0..1, hottest cell 1 (all 0: no positive evidence)


@dataclass(frozen=True)
class Explanation:
    """A caption, word by word: how sure the model was of each word and where in the photo it came from."""

    caption: Caption  # the explained caption; when it was generated, with the decoder's other candidates
    words: tuple[WordExplanation, ...]
    log_prob: float  # the explained caption's total log-probability, <end> included when the caption ended
    image: Image.Image  # the photo the heatmaps are drawn on (orientation applied), at most OVERLAY_MAX_SIDE pixels a side

    @property
    def text(self) -> str:
        return self.caption.text

    def heatmap(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Word `index`'s heatmap upsampled (bicubic) to `size` (width, height; default: the photo's), 0..1."""
        return upsample(self.words[index].heatmap, size or self.image.size)

    def overlay(self, index: int, opacity: float = OVERLAY_OPACITY) -> Image.Image:
        """The photo with word `index`'s heatmap over it."""
        return overlay(self.image, self.words[index].heatmap, opacity)

    @property
    def first_content_word(self) -> int:
        """The index of the first word that isn't a function word ("a", "the", "on", ...); 0 if there is none."""
        return next((i for i, w in enumerate(self.words) if w.word not in FUNCTION_WORDS), 0)


# ---- the maths --------------------------------------------------------------------------------


def word_log_prob_gradients(
    model: StepModel, features: np.ndarray, hidden: np.ndarray, targets: np.ndarray, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each target's log-probability and its gradient with respect to the pooled features.

    features: (C,) one image's pooled features; hidden: (T, units) the LSTM outputs (StepModel.lstm_outputs);
    targets: (T,) token ids; allowed: optional (T, vocab) bool, the tokens the softmax runs over at each
    step (None: all of them, the Keras model's softmax). Returns (log_probs (T,), gradients (T, C)).
    """
    features = np.asarray(features, np.float32).reshape(-1)
    rows = np.arange(len(targets))
    pre_image = features @ model.image_kernel + model.image_bias  # (units,)
    image = np.maximum(pre_image, 0.0)
    pre_hidden = (image + hidden) @ model.decoder_kernel + model.decoder_bias  # (T, units)
    logits = np.maximum(pre_hidden, 0.0) @ model.output_kernel + model.output_bias  # (T, vocab)
    if allowed is not None:
        logits[~allowed] = -np.inf
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_probs = shifted[rows, targets] - np.log(total[:, 0])

    d_logits = exp / -total  # onehot(w) - p
    d_logits[rows, targets] += 1.0
    # Backwards through the layers as (units, T) columns: kernel @ columns runs 2-3x faster in BLAS than
    # rows @ kernel.T with these shapes.
    d_hidden = (model.output_kernel @ d_logits.T) * (pre_hidden.T > 0)
    d_image = (model.decoder_kernel @ d_hidden) * (pre_image > 0)[:, None]
    return log_probs, (model.image_kernel @ d_image).T


def grad_cam(feature_map: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """(h, w, C) map and (T, C) gradients -> (T, h, w) heatmaps, each ReLU'd and scaled to a maximum of 1."""
    height, width, channels = feature_map.shape
    cells = np.asarray(feature_map, np.float32).reshape(height * width, channels) @ gradients.T  # (h w, T)
    cams = np.maximum(cells.T.reshape(-1, height, width), 0.0)
    peaks = cams.max(axis=(1, 2), keepdims=True)
    return np.where(peaks > HEATMAP_FLOOR, cams / np.maximum(peaks, HEATMAP_FLOOR), 0.0).astype(np.float32)


def explain_tokens(
    model: StepModel, vocab: Vocabulary, features: np.ndarray, feature_map: np.ndarray, word_ids: list[int], ended: bool = True
) -> tuple[list[float], np.ndarray, float]:
    """One image's caption (word ids, no special tokens) -> (each word's probability, (words, h, w) heatmaps,
    the caption's total log-probability, with the end token's when `ended`)."""
    targets = np.array([*word_ids, vocab.end_id] if ended else word_ids, np.int64)
    hidden = model.lstm_outputs(np.concatenate([[vocab.start_id], targets[:-1]]).astype(np.int64))  # teacher-forced
    allowed = np.stack([vocab.allowed_tokens(first=t == 0) for t in range(len(targets))])  # what decoding allows
    log_probs, gradients = word_log_prob_gradients(model, features, hidden, targets, allowed)
    words = len(word_ids)
    heatmaps = grad_cam(feature_map, gradients[:words])
    return [float(np.exp(lp)) for lp in log_probs[:words]], heatmaps, float(log_probs.sum())


# ---- drawing ----------------------------------------------------------------------------------


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) heatmap -> (height, width) for size (width, height), bicubic, clipped to 0..1.

    The encoder squashes the whole photo to its input square (no crop), so the map's grid spans the photo.
    """
    grid = Image.fromarray(np.asarray(heatmap, np.float32), mode="F")
    return np.clip(np.asarray(grid.resize(size, Image.BICUBIC)), 0.0, 1.0)


def colourise(heat: np.ndarray) -> np.ndarray:
    """(h, w) values 0..1 -> (h, w, 3) uint8 RGB on the colour ramp."""
    return _RAMP_TABLE[_ramp_index(heat)]


def overlay(photo: Image.Image, heatmap: np.ndarray, opacity: float = OVERLAY_OPACITY) -> Image.Image:
    """The photo with the heatmap's colours over it, more opaque where the heat is higher (Pillow does the
    per-pixel work: a 768-pixel overlay takes a few milliseconds)."""
    levels = Image.fromarray(_ramp_index(upsample(heatmap, photo.size)).astype(np.uint8), mode="L")
    colours = levels.copy()
    colours.putpalette(_RAMP_TABLE.tobytes(), rawmode="RGB")
    mask = levels.point([round(opacity * level) for level in range(256)])
    return Image.composite(colours.convert("RGB"), photo.convert("RGB"), mask)


def _ramp_index(heat: np.ndarray) -> np.ndarray:
    return (np.clip(heat, 0.0, 1.0) * 255.0 + 0.5).astype(np.intp)


def save_overlays(explanation: Explanation, folder: str | Path) -> Path:
    """Write one explanation into `folder` (created): NN_word.jpg, the photo with word NN's heatmap, for each
    word, and words.json (the caption, each word's probability, heatmap grid and overlay file). -> folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = []
    for index, word in enumerate(explanation.words):
        name = f"{index + 1:02d}_{word.word}.jpg"
        explanation.overlay(index).save(folder / name, quality=OVERLAY_JPEG_QUALITY)
        words.append({"word": word.word, "probability": round(word.probability, 5),
                      "heatmap": np.round(word.heatmap.astype(np.float64), 4).tolist(), "overlay": name})
    summary = {"caption": explanation.text, "log_prob": round(explanation.log_prob, 5), "words": words}
    (folder / "words.json").write_text(json.dumps(summary, indent=1) + "\n")
    return folder


def explanation_folder(root: str | Path, image: str | Path, taken: set[str]) -> Path:
    """root/<image's name without suffix>, made unique among `taken` (updated) when two images share a name."""
    stem = Path(image).stem or "image"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return Path(root) / name


# ---- Captioner.explain ---------------------------------------------------------------------------


def explain_caption(model: StepModel, vocab: Vocabulary, features: np.ndarray, feature_map: np.ndarray, photo: Image.Image,
                    hypotheses: list[Hypothesis] | None = None, word_ids: list[int] | None = None) -> Explanation:
    """One image's caption, word by word (Captioner.explain).

    features (C,) and feature_map (h, w, C): the image's, from one encoder pass; photo: what the heatmaps are
    drawn on. The caption: `hypotheses`, decoding's for the image (best first: the first is explained, the
    Caption keeps them all), or `word_ids`, a caption given (caption_ids), explained as one that ended.
    """
    ended = True
    if hypotheses is not None:
        tokens = hypotheses[0].tokens
        ended = bool(tokens) and tokens[-1] == vocab.end_id
        word_ids = list(tokens[:-1] if ended else tokens)
    probabilities, heatmaps, log_prob = explain_tokens(model, vocab, features, feature_map, word_ids, ended)
    if hypotheses is not None:
        caption = Caption.from_hypotheses(vocab, hypotheses)
    else:
        text = " ".join(vocab.itos[i] for i in word_ids)
        caption = Caption(text, [(text, log_prob)], [log_prob])
    words = tuple(WordExplanation(vocab.itos[i], p, heatmap) for i, p, heatmap in zip(word_ids, probabilities, heatmaps))
    return Explanation(caption, words, log_prob, photo)


def caption_ids(vocab: Vocabulary, caption: str) -> list[int]:
    """A caption's words -> ids; a word the vocabulary lacks is refused with a sentence naming it."""
    if not isinstance(caption, str):
        raise ValueError("The caption to explain must be text.")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"The caption to explain is too long: at most {MAX_CAPTION_CHARS} characters.")
    words = normalize_caption(caption)
    if not words:
        raise ValueError("The caption to explain has no words.")
    if len(words) > MAX_CAPTION_WORDS:
        raise ValueError(f"The caption to explain is too long: at most {MAX_CAPTION_WORDS} words.")
    unknown = [word for word in dict.fromkeys(words) if word not in vocab.stoi or vocab.stoi[word] in vocab.forbidden_ids]
    if unknown:
        listed = ", ".join(f"'{word}'" for word in unknown)
        raise ValueError(f"The model's vocabulary has no {'word' if len(unknown) == 1 else 'words'} {listed}.")
    return [vocab.stoi[word] for word in words]
