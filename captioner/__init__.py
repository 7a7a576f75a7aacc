"""An image captioner: a frozen ImageNet CNN and a GloVe-initialised LSTM (the merge model)."""

from .decoding import Caption, DecodingOptions
from .encoder import ENCODERS, ImageEncoder
from .ensemble import Ensemble, load_model
from .image import InvalidImageError, load_image
from .inference import Captioner
from .model import ModelConfig, StepModel, build_caption_model
from .vocabulary import Vocabulary, normalize_caption
from .weights import WeightsError

__all__ = [
    "ENCODERS",
    "Caption",
    "Captioner",
    "DecodingOptions",
    "Ensemble",
    "ImageEncoder",
    "InvalidImageError",
    "ModelConfig",
    "StepModel",
    "Vocabulary",
    "WeightsError",
    "build_caption_model",
    "load_image",
    "load_model",
    "normalize_caption",
]
