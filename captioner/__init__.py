"""An image captioner: a frozen ImageNet CNN and a GloVe-initialised LSTM (the merge model)."""

from .decoding import DecodingOptions, StepDecoder
from .image import InvalidImageError, load_image
from .inference import Caption, Captioner
from .encoder import ENCODERS, ImageEncoder
from .model import ModelConfig, build_caption_model
from .vocabulary import Vocabulary, normalize_caption
from .weights import WeightsError

__all__ = [
    "Caption",
    "Captioner",
    "DecodingOptions",
    "ENCODERS",
    "ImageEncoder",
    "InvalidImageError",
    "ModelConfig",
    "StepDecoder",
    "Vocabulary",
    "WeightsError",
    "build_caption_model",
    "load_image",
    "normalize_caption",
]
