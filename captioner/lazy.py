"""Keras (and TensorFlow under it), imported when first used.

Serving needs neither: the encoder runs from OpenVINO's cached model (backends.py) and decoding is NumPy on
weights read with h5py (weights.py). Importing TensorFlow takes 4-7 s of a cold start on this project's CPU,
so no captioner module imports Keras when it is imported: `from .lazy import keras` gives a stand-in that
imports the real module on its first attribute use (building a model, training), as `keras.layers.Dense`
reads the same either way.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ warnings are not for users


# One thread imports at a time: two threads importing TensorFlow at once (a batch actor's two batches) can
# see each other's half-initialised modules and fail.
_first_import = threading.RLock()


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr closed for the moment.

    Its C++ start-up lines (the oneDNN notice; "Could not find cuda drivers" and "failed call to cuInit"
    on every CPU machine) are written before any log setting applies. Only the messages are hidden: a GPU,
    where there is one (a Spaces GPU), is still found and used, and an import error still raises.
    """
    with _first_import:
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


class LazyModule(types.ModuleType):
    """A module imported on first attribute access (after TensorFlow, quietly)."""

    def __getattr__(self, attribute: str):
        if sys.modules.get(self.__name__) is None:  # (None: a blocked import, which import_module reports)
            with _first_import:
                import_tensorflow_quietly()
                importlib.import_module(self.__name__)
        return getattr(sys.modules[self.__name__], attribute)


keras = LazyModule("keras")
layers = LazyModule("keras.layers")
