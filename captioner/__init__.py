"""An image captioner: a frozen ImageNet CNN and a GloVe-initialised LSTM (the merge model)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ warnings are not for users


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr closed for the moment.

    Its C++ start-up lines (the oneDNN notice; "Could not find cuda drivers" and "failed call to cuInit"
    on every CPU machine) are written before any log setting applies. Only the messages are hidden: a GPU, where there is one (a
    Spaces GPU), is still found and used, and an import error still raises.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow

        tensorflow.config.list_physical_devices()  # the CUDA probe ("failed call to cuInit") happens here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()

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
