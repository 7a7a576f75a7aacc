"""`Captioner`: images in, captions out. The API the app, the CLI, the batch job and training's evaluation use."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .decoding import DecodingOptions, Hypothesis, StepDecoder, decode, length_normalised, prefix_ids
from .encoder import ENCODERS, ImageEncoder
from .explain import Explanation, explain_image
from .lazy import keras
from .model import ModelConfig, build_caption_model
from .vocabulary import Vocabulary
from .weights import BUNDLED_WEIGHTS, WeightsError, WeightsFolder, download_from_hub, load_vocabulary, read_decoder_weights, read_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caption:
    text: str
    candidates: list[tuple[str, float]]  # (caption, total log-probability), best first
    scores: list[float] = dataclasses.field(default_factory=list)  # what decoding ranked them by (beam: with the length penalty)


def caption_from_hypotheses(vocab: Vocabulary, hypotheses: list[Hypothesis], options: DecodingOptions) -> Caption:
    """One image's hypotheses (best first) -> its Caption."""
    candidates = [(vocab.decode(h.tokens), h.log_prob) for h in hypotheses]
    alpha = options.length_penalty if options.method == "beam" else 0.0  # greedy keeps one caption, unranked
    scores = [length_normalised(h.log_prob, len(h.tokens), alpha) for h in hypotheses]
    return Caption(candidates[0][0], candidates, scores)


class Captioner:
    def __init__(self, model: keras.Model | Mapping[str, Sequence[np.ndarray]], vocab: Vocabulary, config: ModelConfig,
                 encoder_weights: str | Path | None = "imagenet", weights: WeightsFolder | None = None):
        """model: the Keras caption model, or its layers' weights by name (what from_folder reads, without Keras).

        encoder_weights: what ImageEncoder loads when the encoder is first needed ("imagenet", a file, None: random).
        """
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} ids, config says {config.vocab_size}")
        if config.encoder not in ENCODERS:
            raise WeightsError(f"Unknown encoder '{config.encoder}'; known: {', '.join(ENCODERS)}.")
        self.vocab, self.config, self.weights = vocab, config, weights
        self.encoder_weights = encoder_weights
        self.step_decoder = StepDecoder(model)  # all that captioning needs of the network
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
    def from_folder(cls, folder: WeightsFolder) -> "Captioner":
        config = folder.config
        if config.encoder not in ENCODERS:
            raise WeightsError(f"Unknown encoder '{config.encoder}' in {folder.path}; known: {', '.join(ENCODERS)}.")
        vocab = load_vocabulary(folder)
        # The encoder's weights: the folder's own encoder.weights.h5 if it has one, else keras.applications' ImageNet ones.
        encoder_weights = None if folder.encoder_weights == "random" else folder.encoder_file or "imagenet"
        return cls(read_decoder_weights(folder), vocab, config, encoder_weights, folder)

    @cached_property
    def encoder(self) -> ImageEncoder:
        """The image encoder, built on first use: captioning cached features never loads it."""
        return ImageEncoder(self.config.encoder, weights=self.encoder_weights)

    # ---- inference ----------------------------------------------------------------------

    def encode(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> (n, feature_dim) pooled CNN features."""
        return self.encoder(images)

    def caption(self, image, options: DecodingOptions | None = None, **overrides) -> Caption:
        """One image -> its caption. overrides: DecodingOptions fields, e.g. caption(image, method="greedy")."""
        return self.caption_batch([image], options, **overrides)[0]

    def caption_batch(self, images, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        options = self.decoding_options(options, **overrides)  # refuse bad options before the encoder runs
        return self.caption_features(self.encode(images), options)

    def caption_features(self, features: np.ndarray, options: DecodingOptions | None = None, **overrides) -> list[Caption]:
        """Caption precomputed encoder features (training's evaluation and dev scores use this)."""
        options = self.decoding_options(options, **overrides)
        return [
            caption_from_hypotheses(self.vocab, hypotheses, options)
            for hypotheses in decode(self.step_decoder, self.vocab, features, options, self.config.max_new_tokens)
        ]

    def explain(self, image, caption: str | None = None, options: DecodingOptions | None = None, **overrides) -> Explanation:
        """Each word of the caption with its probability and where in the image it came from (closed-form Grad-CAM).

        caption: the words to explain; None: caption the image first, with `options` and `overrides`.
        See captioner/explain.py.
        """
        return explain_image(self, image, caption, self.decoding_options(options, **overrides))

    def decoding_options(self, options: DecodingOptions | None = None, **overrides) -> DecodingOptions:
        """`options` (default: the recommended decoding) with `overrides`, checked against this model's vocabulary."""
        options = dataclasses.replace(options or DecodingOptions(), **overrides)
        prefix_ids(self.vocab, options.prefix)  # a prompt with words the model doesn't know is refused here, by name
        return options

    def warmup(self) -> None:
        """Run the encoder graph once (it is traced on first use), so the first user doesn't wait for it."""
        width, height = self.encoder.input_size
        self.encoder.encode_pixels(np.zeros((1, height, width, 3), np.float32))

    @property
    def description(self) -> dict:
        """Facts about the loaded model, for the app's info line."""
        info = {"encoder": self.config.encoder, "vocab_size": self.config.vocab_size}
        if self.weights is not None:
            info["source"] = self.weights.source
            info["revision"] = self.weights.revision
            info["metrics"] = self.weights.metrics
        return info
