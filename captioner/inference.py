"""`Captioner`: images in, captions out. The API the app, the CLI, the batch job and training's evaluation use."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .decoding import Caption, DecodingOptions, DecodingTask, Hypothesis, Naming, mean_token_log_prob
from .encoder import BATCH_SIZE as ENCODER_BATCH_SIZE
from .encoder import ENCODERS, ImageEncoder
from .explain import OVERLAY_MAX_SIDE, Explanation, caption_ids, explain_caption
from .image import display_copy, load_image, prepare_pixels, resize_for_encoder
from .lazy import keras
from .model import Int8StepModel, ModelConfig, StepModel, build_caption_model, decoder_precision
from .visual import Familiarity, ImageNetHead, read_familiarity_and_words
from .vocabulary import Vocabulary
from .weights import (BUNDLED_WEIGHTS, WEIGHTS_FILE, WeightsError, WeightsFolder, download_from_hub, load_vocabulary,
                      read_decoder_weights, read_folder)

log = logging.getLogger(__name__)


def display_photo(pixels: np.ndarray, display: Image.Image | np.ndarray | None) -> Image.Image:
    """The photo an explanation's heatmaps are drawn on: `display` (PIL image or uint8 array), else the pixels."""
    return display if isinstance(display, Image.Image) else Image.fromarray(np.asarray(pixels if display is None else display))


def int8_step_model(model: StepModel, folder: WeightsFolder) -> StepModel:
    """The folder's network stepping with its decoder.onnx, if that was made from this folder's decoder (it names its
    checksum) and ONNX Runtime imports; else, with a warning, the NumPy step."""
    try:
        step = Int8StepModel.load(model, folder.decoder_step)
    except Exception as exc:  # a folder's file, not trusted: ONNX Runtime's own errors (bad protobuf, bad graph), misfits
        log.warning("The int8 decoder %s can't be loaded (%s); decoding in float32 NumPy.", folder.decoder_step, exc)
        return model
    made_from = step.session.get_modelmeta().custom_metadata_map.get("decoder_sha256")
    if made_from != folder.decoder_sha256:  # (read_folder checked the file against it: no second hash)
        log.warning("%s was made from another decoder than %s's; decoding in float32 NumPy (export it again with "
                    "`python -m training.export_decoder`).", folder.decoder_step, WEIGHTS_FILE)
        return model
    return step


class Captioner:
    def __init__(self, model: keras.Model | Mapping[str, Sequence[np.ndarray]], vocab: Vocabulary, config: ModelConfig,
                 encoder_weights: str | Path | None = "imagenet", weights: WeightsFolder | None = None,
                 decoder: str | None = None):
        """model: the Keras caption model, or its layers' weights by name (what from_folder reads, without Keras).

        encoder_weights: what ImageEncoder loads when the encoder is first needed ("imagenet", a file, None: random).
        decoder: "int8" steps with the folder's decoder.onnx where it has one, "float32" in NumPy; None: $CAPTIONER_DECODER,
        else int8 (model.decoder_precision).
        """
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} ids, config says {config.vocab_size}")
        if config.encoder not in ENCODERS:
            raise WeightsError(f"Unknown encoder '{config.encoder}'; known: {', '.join(ENCODERS)}.")
        self.vocab, self.config, self.weights = vocab, config, weights
        self.encoder_weights = encoder_weights
        self.step_model = StepModel(model)  # all that captioning needs of the network
        if weights is not None and weights.decoder_step is not None and (decoder or decoder_precision()) == "int8":
            self.step_model = int8_step_model(self.step_model, weights)
        if isinstance(model, Mapping):
            self._layer_weights = model
        else:
            self.model = model  # (set before model's first use, it takes the cached property's place)

    @cached_property
    def model(self) -> keras.Model:
        """The Keras caption model (training and tests use it), built on first use: captioning never needs it."""
        model = build_caption_model(self.config)
        for name, arrays in self._layer_weights.items():
            model.get_layer(name).set_weights(arrays)
        return model

    # ---- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, revision: str | None = None) -> "Captioner":
        """Load from a local weights folder or a Hugging Face Hub model repo.

        With no source: the Hub repo in $CAPTIONER_REPO (at $CAPTIONER_REVISION) if set,
        falling back to the bundled weights/ folder when the Hub can't deliver it.
        """
        if source is None:
            repo = os.environ.get("CAPTIONER_REPO", "").strip()
            if not repo:
                return cls.from_folder(read_folder(BUNDLED_WEIGHTS, source="bundled weights/"))
            try:
                return cls.from_folder(download_from_hub(repo, revision or os.environ.get("CAPTIONER_REVISION") or None))
            except WeightsError as exc:
                log.warning("%s Falling back to the bundled weights/.", exc)
                return cls.from_folder(read_folder(BUNDLED_WEIGHTS, source=f"bundled weights/ (Hub failed: {exc})"))
        if Path(source).is_dir():
            return cls.from_folder(read_folder(source))
        if str(source).count("/") != 1 or str(source).startswith((".", "/")):
            raise WeightsError(f"'{source}' is neither a weights folder nor a Hub repo id like 'user/name'.")
        return cls.from_folder(download_from_hub(str(source), revision))

    @classmethod
    def from_folder(cls, folder: WeightsFolder, decoder: str | None = None) -> "Captioner":
        config = folder.config
        if config.encoder not in ENCODERS:
            raise WeightsError(f"Unknown encoder '{config.encoder}' in {folder.path}; known: {', '.join(ENCODERS)}.")
        vocab = load_vocabulary(folder)
        # The encoder's weights: the folder's own encoder.weights.h5 if it has one, else keras.applications' ImageNet ones.
        encoder_weights = None if folder.encoder_weights == "random" else folder.encoder_file or "imagenet"
        return cls(read_decoder_weights(folder), vocab, config, encoder_weights, folder, decoder)

    # ---- what the encoder sees: the folder's optional files (weights.py), read on first use -----------

    @cached_property
    def head(self) -> ImageNetHead | None:
        """The encoder's ImageNet classifier: each caption's objects. None: the folder has none."""
        return ImageNetHead.read(self.weights.head_file) if self.weights and self.weights.head_file else None

    @cached_property
    def _visual(self):
        if self.weights is None or self.weights.visual_files is None:
            return None, None
        return read_familiarity_and_words(*self.weights.visual_files, self.vocab.itos)

    @property
    def familiarity(self) -> Familiarity | None:
        """The familiarity flag's summary of the training photos and threshold. None: the folder has none."""
        return self._visual[0]

    @cached_property
    def naming(self) -> Naming | None:
        """What DecodingOptions.name_objects needs: the classes' caption words, the vocabulary and network grown by
        the new ones. None: the folder has no word map (or no classifier to read the objects with)."""
        visual_words = self._visual[1]
        if visual_words is None or self.head is None:
            return None
        return Naming.grown(self.step_model, self.vocab, visual_words)

    @cached_property
    def encoder(self) -> ImageEncoder:
        """The image encoder, built on first use: captioning cached features never loads it."""
        return ImageEncoder(self.config.encoder, weights=self.encoder_weights,  # the folder's OpenVINO model, if any
                            ir=self.weights.encoder_ir if self.weights is not None else None)

    # ---- inference: images -> pixels -> features -> captions ---------------------------------

    @property
    def input_size(self) -> tuple[int, int]:
        """The (width, height) of the pixels caption_pixels and encode_pixels take: its encoder's."""
        return self.encoder.input_size

    def prepare_pixels(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> (n, h, w, 3) uint8, each decoded and resized for the
        encoder (image.prepare_pixels: what a decode worker sends back)."""
        return np.stack([prepare_pixels(image, self.encoder.input_size) for image in images])

    def encode_pixels(self, pixels: np.ndarray, feature_maps: bool = False):
        """(n, h, w, 3) uint8 pixels at the encoder's input size -> (n, feature_dim) pooled CNN features, or
        (features, (n, h', w', C) feature maps). The one way into the encoder, ENCODER_BATCH_SIZE images a call."""
        pixels = np.asarray(pixels)
        width, height = self.encoder.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (height, width, 3):
            raise ValueError(f"Expected pixels of shape (n, {height}, {width}, 3), not {pixels.shape}.")
        if not len(pixels) and not feature_maps:
            return np.zeros((0, self.config.feature_dim), np.float32)
        chunks = [self.encoder.encode_pixels(pixels[i : i + ENCODER_BATCH_SIZE], feature_maps)
                  for i in range(0, len(pixels), ENCODER_BATCH_SIZE)]
        if feature_maps:
            return tuple(np.concatenate(parts) for parts in zip(*chunks))
        return np.concatenate(chunks)

    def encode(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> (n, feature_dim) pooled CNN features."""
        return self.encode_pixels(self.prepare_pixels(images))

    def caption(self, image, options: DecodingOptions | None = None, **overrides) -> Caption:
        """One image -> its caption. overrides: DecodingOptions fields, e.g. caption(image, method="greedy")."""
        return self.caption_batch([image], options, **overrides)[0]

    def caption_batch(self, images, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        task = self.decoding_task(options, **overrides)  # refuse bad options before the encoder runs
        return self._captions(task, self.encode(images))

    def caption_pixels(self, pixels: np.ndarray, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        """(n, h, w, 3) uint8 pixels at the encoder's input size (a decode worker's) -> their captions."""
        task = self.decoding_task(options, **overrides)
        return self._captions(task, self.encode_pixels(pixels))

    def caption_features(self, features: np.ndarray, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        """Caption precomputed encoder features (training's evaluation and dev scores use this)."""
        return self._captions(self.decoding_task(options, **overrides), features)

    def _captions(self, task: DecodingTask, features: np.ndarray) -> list[Caption]:
        probabilities = self._class_probabilities(features)
        found = task.run(features, class_probabilities=probabilities)
        described = self._described(features, probabilities, [h[0] for h in found])
        return [Caption.from_hypotheses(task.words, hypotheses, **extra) for hypotheses, extra in zip(found, described)]

    def _class_probabilities(self, features: np.ndarray) -> np.ndarray | None:
        return self.head.probabilities(features) if self.head is not None and len(features) else None

    def _described(self, features: np.ndarray, probabilities: np.ndarray | None, captions: list[Hypothesis]) -> list[dict]:
        """Each image's objects and familiarity (Caption's fields), from its features and its caption (its sureness, and
        what it names against what the classifier sees: Familiarity.contradicted)."""
        described = [{} for _ in range(len(features))]
        if probabilities is not None:
            for extra, row in zip(described, probabilities):
                extra["objects"] = self.head.objects(row)
        if self.familiarity is not None and probabilities is not None:
            familiarity, words = self._visual
            groups = words.group_probabilities(probabilities)
            confidences = groups.max(axis=1)  # (VisualWords.confidence, from the groups computed once)
            scores = familiarity.scores(features, np.array([mean_token_log_prob(c) for c in captions]), confidences)
            contradicted = familiarity.contradicted(words, groups, [c.tokens for c in captions])
            for extra, score, against in zip(described, scores, contradicted):
                extra.update(familiar=bool(score >= familiarity.threshold and not against), familiarity=round(float(score), 3))
        return described

    def explain(self, image, caption: str | None = None, options: DecodingOptions | None = None, **overrides) -> Explanation:
        """Each word of the caption with its probability and where in the image it came from (closed-form Grad-CAM).

        caption: the words to explain; None: caption the image first, with `options` and `overrides`.
        See captioner/explain.py.
        """
        task = self.decoding_task(options, **overrides)
        given = None if caption is None else caption_ids(task.words, caption)  # refused before any work (named words too)
        photo = load_image(image, target_size=self.encoder.input_size)
        return self._explain(task, resize_for_encoder(photo, self.encoder.input_size), photo, given)

    def explain_pixels(self, pixels: np.ndarray, display: Image.Image | np.ndarray | None = None, caption: str | None = None,
                       options: DecodingOptions | None = None, **overrides) -> Explanation:
        """`explain` for one image's (h, w, 3) uint8 pixels at the encoder's input size (a decode worker's).

        display: the photo to draw the heatmaps on, aspect kept (PIL image or uint8 array); None: the pixels.
        """
        task = self.decoding_task(options, **overrides)
        given = None if caption is None else caption_ids(task.words, caption)
        return self._explain(task, pixels, display_photo(pixels, display), given)

    def _explain(self, task: DecodingTask, pixels: np.ndarray, photo: Image.Image, given: list[int] | None) -> Explanation:
        """One encoder pass gives both the pooled features (for the caption) and the feature map (for the heatmaps)."""
        features, maps = self.encode_pixels(np.asarray(pixels)[None], feature_maps=True)
        return self.explain_encoded(task, features, maps, photo, given)

    def explain_encoded(self, task: DecodingTask, features: np.ndarray, maps: np.ndarray, photo: Image.Image,
                        given: list[int] | None = None) -> Explanation:
        """`explain` from one image's encoder outputs, (1, feature_dim) pooled features and (1, h, w, C) feature map
        (an ensemble explains its caption with a member's, encoded once: ensemble.py). given: the caption's ids in
        task.words; None: decoded with the task."""
        probabilities = self._class_probabilities(features)
        hypotheses = task.run(features, class_probabilities=probabilities)[0] if given is None else None
        model = task.naming.model if task.naming else self.step_model  # (a caption may hold a word the folder added)
        explanation = explain_caption(model, task.words, features[0], maps[0], display_copy(photo, OVERLAY_MAX_SIDE),
                                      hypotheses, given)
        # The caption as captioning measures its sureness (a given caption's: read as one that ended).
        caption = hypotheses[0] if hypotheses else Hypothesis((*given, task.words.end_id), explanation.log_prob, explanation.log_prob)
        (extra,) = self._described(features, probabilities, [caption])
        return dataclasses.replace(explanation, caption=dataclasses.replace(explanation.caption, **extra))

    def decoding_task(self, options: DecodingOptions | None = None, **overrides) -> DecodingTask:
        """`options` (default: the recommended decoding) with `overrides`, resolved for this model; a prompt with
        words the model doesn't know is refused here, by name."""
        options = dataclasses.replace(options or DecodingOptions(), **overrides)
        return DecodingTask(self.step_model, self.vocab, options, self.config.max_new_tokens,
                            self.naming if options.name_objects else None)

    def decoding_options(self, options: DecodingOptions | None = None, **overrides) -> DecodingOptions:
        """`options` with `overrides`, checked against this model's vocabulary (see decoding_task)."""
        return self.decoding_task(options, **overrides).options

    def warmup(self) -> None:
        """Run the encoder graph once (it is traced on first use), so the first user doesn't wait for it."""
        width, height = self.encoder.input_size
        self.encode_pixels(np.zeros((1, height, width, 3), np.uint8))

    @property
    def description(self) -> dict:
        """Facts about the loaded model, for the app's info line."""
        info = {"encoder": self.config.encoder, "vocab_size": self.config.vocab_size,
                "decoder": "int8" if isinstance(self.step_model, Int8StepModel) else "float32"}
        if self.weights is not None:
            info["source"] = self.weights.source
            info["revision"] = self.weights.revision
            info["metrics"] = self.weights.metrics
        return info
