"""Encoder backends: the one Keras encoder (encoder.py) run by OpenVINO or by TensorFlow.

Both take the Keras model that maps preprocessed pixels to the CNN's last feature map and
give the pooled features (the map's global average), and the map itself when asked.

- TensorFlow runs the Keras model as it is: the reference, and the fallback.
- OpenVINO compiles that same Keras model at load time (converted in memory, nothing
  exported by hand). On this project's 2-core CPU it encodes an image several times
  faster than TensorFlow (benchmarks/speed.py). Converting costs a few seconds, so the
  converted model and OpenVINO's compiled blob are cached on disk, under a key that says
  what the model computes (the encoder's name, weights checksum, defining sources and
  versions: encoder.encoder_cache_key; for any other Keras model, a fingerprint of its layers
  and weights). A restart finds them by that key without building the Keras model, or
  importing Keras: it loads them in a fraction of a second.

A weights folder may carry the encoder as an OpenVINO model itself (encoder.xml + encoder.bin, float16 or int8:
training/export_encoder.py): OpenVINO then compiles that file, and nothing is converted or needs Keras.

`CAPTIONER_BACKEND=openvino|tensorflow` chooses; the default is OpenVINO where it imports.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .lazy import import_tensorflow_quietly, keras

log = logging.getLogger(__name__)

BACKEND_VARIABLE = "CAPTIONER_BACKEND"
BACKENDS = ("openvino", "tensorflow")
CACHE_VARIABLE = "CAPTIONER_CACHE"  # where the OpenVINO cache lives; default ~/.cache/captioner
# Part of the cache key: bump it when the way models are converted changes.
CACHE_FORMAT = 1
# OpenVINO's default precision on a CPU with AVX512_BF16 (this project's has it) is bf16,
# which moves MobileNetV2's features far from TensorFlow's (cosine 0.979): f32 keeps them
# within 1e-4 (tests/test_backends.py), and the captions identical.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


class EncoderBackend:
    """Preprocessed pixels (n, h, w, 3) float32 -> pooled (n, C), or (pooled, maps (n, h', w', C))."""

    name: str

    def __call__(self, pixels: np.ndarray, feature_maps: bool = False):
        raise NotImplementedError


def backend_name(requested: str | None = None) -> str:
    """The backend to use: `requested`, else $CAPTIONER_BACKEND, else OpenVINO where it imports."""
    name = (requested or os.environ.get(BACKEND_VARIABLE, "")).strip().lower()
    if not name:
        return "openvino" if _openvino_available() else "tensorflow"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE} must be 'openvino' or 'tensorflow', not {name!r}.")
    return name


class KerasMissing(ImportError):
    """The encoder must be built in Keras, which isn't installed; the message says what to install."""


def load_backend(build_model: Callable[[], keras.Model], name: str | None = None, cache_key: str | None = None,
                 ir: str | os.PathLike | None = None, pixel_normalization: tuple[float, float] | None = None) -> EncoderBackend:
    """Run the Keras model `build_model()` gives with the chosen backend; OpenVINO falls back to TensorFlow if it
    can't compile it. cache_key: what names the model in OpenVINO's cache (then it is built only if the cache
    lacks it); None: the built model's fingerprint. ir: an OpenVINO model (.xml) of the encoder, which OpenVINO
    compiles instead of converting the Keras model (TensorFlow still runs the Keras model: the reference).
    pixel_normalization: see OpenVINOBackend."""
    name = backend_name(name)
    if name == "openvino":
        try:
            return OpenVINOBackend(build_model, cache_key=cache_key, ir=ir, pixel_normalization=pixel_normalization)
        except KerasMissing:
            raise
        except ImportError as exc:
            log.warning("OpenVINO isn't installed (%s); the encoder runs on TensorFlow.", exc)
        except Exception as exc:  # an operation OpenVINO can't convert: TensorFlow runs every Keras model
            log.warning("OpenVINO couldn't compile the encoder (%s); it runs on TensorFlow.", exc)
    return TensorFlowBackend(build_model())


def _with_pooling(feature_map_model: keras.Model) -> keras.Model:
    """pixels -> (pooled, maps): the same graph for both backends, pooling included."""
    maps = feature_map_model.output
    pooled = keras.layers.GlobalAveragePooling2D(name="feature_pooling")(maps)
    return keras.Model(feature_map_model.inputs, [pooled, maps], name=f"{feature_map_model.name}_pooled")


class TensorFlowBackend(EncoderBackend):
    name = "tensorflow"

    def __init__(self, feature_map_model: keras.Model):
        import_tensorflow_quietly()
        import tensorflow as tf

        model = _with_pooling(feature_map_model)
        signature = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)]
        # Traced graphs for any batch size: model.predict() costs ~20 ms of overhead per call,
        # as much as MobileNetV2's whole forward pass on one image. Each is traced on first use.
        self._pooled = tf.function(lambda pixels: model(pixels, training=False)[0], input_signature=signature)
        self._both = tf.function(lambda pixels: tuple(model(pixels, training=False)), input_signature=signature)
        self._tf = tf

    def __call__(self, pixels: np.ndarray, feature_maps: bool = False):
        pixels = self._tf.constant(np.asarray(pixels, np.float32))
        if not feature_maps:
            return self._pooled(pixels).numpy()
        pooled, maps = self._both(pixels)
        return pooled.numpy(), maps.numpy()


class OpenVINOBackend(EncoderBackend):
    name = "openvino"

    def __init__(self, feature_map_model: keras.Model | Callable[[], keras.Model] | None, cache_dir: str | os.PathLike | None = None,
                 cache_key: str | None = None, ir: str | os.PathLike | None = None,
                 pixel_normalization: tuple[float, float] | None = None):
        """feature_map_model: the Keras model, or a function that builds it, called only if the cache lacks it.
        cache_key: names the model in the cache; None: the built model's fingerprint (model_fingerprint).
        ir: the encoder as an OpenVINO model (a weights folder's encoder.xml, pixels -> (pooled, maps)): compiled
        as it is (OpenVINO's compiled blob cached), with no Keras model built or converted.
        pixel_normalization: with ir, (mean, scale) of the encoder's preprocessing ((pixels - mean) / scale): one
        image's uint8 pixels then go straight in (encode_one_image)."""
        ov = import_openvino()

        self.core = _core()
        if ir is not None:
            cache = Path(cache_dir) if cache_dir else default_cache_dir()
            self.cache_hit, self.ir, self._pixel_normalization = True, Path(ir), pixel_normalization
            self._config = {**OPENVINO_CONFIG, "CACHE_DIR": str(cache / "openvino" / "compiled")}
            try:
                (cache / "openvino" / "compiled").mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only or full disk
                log.warning("The OpenVINO cache at %s can't be used (%s); compiling without it.", cache, exc)
                self._config = OPENVINO_CONFIG
            # Compiled now, so that a model OpenVINO can't compile is known at load: the one-image model where there
            # is one (the model for batches of preprocessed pixels then waits for its first batch: a server of one
            # photo at a time never compiles it), else the model for batches.
            self._one_image if pixel_normalization is not None else self.compiled  # noqa: B018
            return
        self.ir = None
        given = None if callable(feature_map_model) and not hasattr(feature_map_model, "inputs") else feature_map_model

        @functools.cache
        def model() -> keras.Model:  # built (once) only when needed: for the fingerprint, or when the cache lacks the key
            return _with_pooling(given if given is not None else feature_map_model())
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        key = cache_key or model_fingerprint(model(), ov.__version__)
        self.cache_hit = False
        folder, config = cache / "openvino" / key, {**OPENVINO_CONFIG, "CACHE_DIR": str(cache / "openvino" / "compiled")}
        try:
            try:
                self.compiled = self.core.compile_model(str(self._cached_ir(model, folder, ov)), "CPU", config)
            except RuntimeError:
                if not self.cache_hit:
                    raise
                log.warning("The cached OpenVINO model in %s is damaged; converting again.", folder)
                shutil.rmtree(folder, ignore_errors=True)
                self.cache_hit = False
                self.compiled = self.core.compile_model(str(self._cached_ir(model, folder, ov)), "CPU", config)
        except OSError as exc:  # a read-only or full disk: compile without the cache, at the usual cost
            log.warning("The OpenVINO cache at %s can't be used (%s); compiling without it.", cache, exc)
            self.compiled = self.core.compile_model(_convert(model()), "CPU", OPENVINO_CONFIG)
        self._outputs(self.compiled)

    def _outputs(self, compiled) -> None:
        # Which output is which: the pooled features have rank 2, the maps rank 4.
        ranks = [len(output.get_partial_shape()) for output in compiled.outputs]
        self._pooled_index, self._maps_index = ranks.index(2), ranks.index(4)
        self._requests = threading.local()  # an infer request serves one call at a time: one per thread

    @functools.cached_property
    def compiled(self):
        """The folder's model for any batch of preprocessed pixels, compiled on first use (the converted Keras model's
        is set in __init__)."""
        compiled = self.core.compile_model(str(self.ir), "CPU", self._config)
        self._outputs(compiled)
        return compiled

    @functools.cached_property
    def _one_image(self):
        """The folder's model for one image of uint8 pixels: its shape fixed at batch 1 and its preprocessing inside
        it, as OpenVINO's preprocessing steps (the same features as the float path; about 20% faster here)."""
        model = one_image_model(self.core.read_model(str(self.ir)), self._pixel_normalization)
        compiled = self.core.compile_model(model, "CPU", self._config)
        ranks = [len(output.get_partial_shape()) for output in compiled.outputs]
        return compiled, compiled.outputs[ranks.index(2)], compiled.outputs[ranks.index(4)], threading.local()

    @property
    def encode_one_image(self):
        """(1, h, w, 3) uint8 pixels -> pooled (1, C), or (pooled, maps); None: this backend has no such path (the
        Keras model converted at load, or an encoder without pixel_normalization)."""
        if self.__dict__.get("ir") is None or self._pixel_normalization is None:
            return None
        return self._encode_one_image

    def _encode_one_image(self, pixels: np.ndarray, feature_maps: bool = False):
        compiled, pooled, maps, requests = self._one_image
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        # The tensor set and read directly: infer(inputs)'s argument checks cost about 0.1 ms a call (6% of it here).
        # OpenVINO shares only writeable memory; a PIL image's np.asarray is read-only, so that one is copied.
        pixels = np.require(pixels, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
        request.set_input_tensor(import_openvino().Tensor(pixels, shared_memory=True))
        request.infer()
        if not feature_maps:  # (copied: the request's buffers are reused by its next call)
            return request.get_tensor(pooled).data.copy()
        return request.get_tensor(pooled).data.copy(), request.get_tensor(maps).data.copy()

    def _cached_ir(self, build_model: Callable[[], keras.Model], folder: Path, ov) -> Path:
        """The converted model (OpenVINO IR) in `folder`, building and converting it only if no earlier process did."""
        xml = folder / "encoder.xml"
        if xml.is_file() and (folder / "encoder.bin").is_file():
            self.cache_hit = True
            return xml
        model = build_model()
        log.info("Converting the %s encoder to OpenVINO (once; cached in %s).", model.name, folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            # f32 weights as trained (the default would store them as f16).
            ov.save_model(_convert(model), str(staging / "encoder.xml"), compress_to_fp16=False)
            try:
                staging.rename(folder)  # atomic: another process either sees the whole folder or none
            except OSError:
                if not xml.is_file():  # not "another process got there first"
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return xml

    def __call__(self, pixels: np.ndarray, feature_maps: bool = False):
        compiled = self.compiled  # (first: a folder's model is compiled on first use)
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = compiled.create_infer_request()
        outputs = request.infer([np.ascontiguousarray(pixels, dtype=np.float32)])  # copies out of the request's buffers
        pooled = outputs[compiled.outputs[self._pooled_index]]
        if not feature_maps:
            return pooled
        return pooled, outputs[compiled.outputs[self._maps_index]]


def one_image_model(model, pixel_normalization: tuple[float, float]):
    """An encoder's OpenVINO model (preprocessed pixels -> pooled, maps) -> the model for one image of uint8 pixels
    (OpenVINOBackend's one-image path): its batch fixed at 1, the encoder's pixel normalization (mean, scale) inside
    it as OpenVINO's preprocessing steps. Reshapes `model` in place."""
    from openvino.preprocess import PrePostProcessor

    ov = import_openvino()
    model.reshape([1, *(dimension.get_length() for dimension in list(model.inputs[0].get_partial_shape())[1:])])
    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(ov.Type.u8)
    mean, scale = pixel_normalization
    steps.input().preprocess().convert_element_type(ov.Type.f32).mean(mean).scale(scale)
    return steps.build()


def _convert(model: keras.Model):
    ov = import_openvino()
    with warnings.catch_warnings():  # Keras notes that OpenVINO's tracer passes the input as a tuple: harmless
        warnings.simplefilter("ignore", UserWarning)
        return ov.convert_model(model)


def import_openvino():
    """`import openvino`, without its usage reports.

    OpenVINO reports its import and every model conversion to Google Analytics (the openvino_telemetry package)
    unless the machine's user opted out or CI=true is set: a server would look that host up for every start.
    Nothing here may connect anywhere unasked, so the package is hidden from OpenVINO, which then uses its own
    no-op stand-in, as when the package isn't installed (tests/test_security_round3.py watches for connections).
    """
    sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def model_fingerprint(model: keras.Model, *versions: str) -> str:
    """A key for a Keras model's computation: its layers' types and settings, its input shape and weights.

    Layer names are left out (Keras numbers them by creation order, so the same model built twice gets
    different names); the weights tell trained models apart. About 0.15 s for MobileNetV2.
    """
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, keras.__version__, *versions, list(model.input_shape)]).encode())
    for layer in _leaf_layers(model):
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        digest.update(json.dumps([type(layer).__name__, config], sort_keys=True, default=str).encode())
    for value in map(np.ascontiguousarray, model.get_weights()):
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.data)
    return digest.hexdigest()[:32]


def _leaf_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


_core_lock = threading.Lock()
_openvino_core = None


def _core():
    """One OpenVINO runtime per process."""
    global _openvino_core
    with _core_lock:
        if _openvino_core is None:
            _openvino_core = import_openvino().Core()
        return _openvino_core


def _openvino_available() -> bool:
    try:
        import_openvino()
    except ImportError:
        return False
    return True
