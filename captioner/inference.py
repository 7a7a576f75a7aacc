"""`Captioner`: images in, captions out. The API the app, the CLI and scripts use."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .decoding import DecodingOptions, decode
from .encoder import ENCODERS, ImageEncoder
from .model import ModelConfig, StepDecoder, build_caption_model
from .vocabulary import Vocabulary
from .weights import BUNDLED_WEIGHTS, WEIGHTS_FILE, WeightsError, WeightsFolder, download_from_hub, load_vocabulary, read_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caption:
    text: str
    candidates: list[tuple[str, float]]  # (caption, total log-probability), best first


class Captioner:
    def __init__(self, model: keras.Model, vocab: Vocabulary, config: ModelConfig, encoder: ImageEncoder, weights: WeightsFolder | None = None):
        if len(vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} ids, config says {config.vocab_size}")
        if encoder.name != config.encoder:
            raise ValueError(f"the decoder was trained on {config.encoder} features, not {encoder.name}")
        self.model, self.vocab, self.config, self.encoder, self.weights = model, vocab, config, encoder, weights
        self.step_decoder = StepDecoder(model)

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
        model = build_caption_model(config)
        try:
            model.load_weights(folder.path / WEIGHTS_FILE)
        except Exception as exc:  # shape mismatch, broken HDF5
            raise WeightsError(f"{folder.path / WEIGHTS_FILE} does not fit the model in config.json: {exc}") from None
        encoder = ImageEncoder(config.encoder, weights=None if folder.encoder_weights == "random" else "imagenet")
        return cls(model, vocab, config, encoder, folder)

    # ---- inference ----------------------------------------------------------------------

    def encode(self, images) -> np.ndarray:
        """Images (PIL, paths, bytes or HxWx3 arrays) -> (n, feature_dim) pooled CNN features."""
        return self.encoder(images)

    def caption(self, image, method: str = "greedy", beam_width: int = 5, max_length: int | None = None, length_penalty: float = 0.0) -> Caption:
        return self.caption_batch([image], method, beam_width, max_length, length_penalty)[0]

    def caption_batch(self, images, method: str = "greedy", beam_width: int = 5, max_length: int | None = None, length_penalty: float = 0.0) -> list[Caption]:
        options = DecodingOptions(method, beam_width, max_length, length_penalty)  # validate before the encoder runs
        return self.caption_features(self.encode(images), options)

    def caption_features(self, features: np.ndarray, options: DecodingOptions = DecodingOptions()) -> list[Caption]:
        """Caption precomputed encoder features (training's evaluation uses this)."""
        results = []
        for hypotheses in decode(self.step_decoder, self.vocab, features, options, self.config.max_new_tokens):
            candidates = [(self.vocab.decode(h.tokens), h.log_prob) for h in hypotheses]
            results.append(Caption(candidates[0][0], candidates))
        return results

    def warmup(self) -> None:
        """Run the encoder graph once (it is traced on first use), so the first user doesn't wait for it."""
        self.encoder.encode_pixels(np.zeros((1, *self.encoder.spec.input_size[::-1], 3), np.float32))

    @property
    def description(self) -> dict:
        """Facts about the loaded model, for the app's info line."""
        info = {"encoder": self.config.encoder, "vocab_size": self.config.vocab_size}
        if self.weights is not None:
            info["source"] = self.weights.source
            info["revision"] = self.weights.revision
            info["metrics"] = self.weights.metrics
        return info
