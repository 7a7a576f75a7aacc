"""Reading a TensorFlow.js layers model's weights with NumPy alone: no TensorFlow.js, no Node, no pickle.

A TF.js "layers-model" is a `model.json` (the Keras topology and a `weightsManifest`) beside binary shards.
The manifest lists groups; each group's shards, joined in order, hold its weights back to back, each as
`shape` values of `dtype` in little-endian order, in the order listed. That is the whole format
(tfjs-converter's `write_weights`); quantized weights (a `quantization` entry) are refused, not guessed at.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable

import numpy as np

DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}


class TfjsFormatError(ValueError):
    """The files are not a TF.js layers model this reader understands; the message says what is wrong."""


def read_layers_model(read_member: Callable[[str], bytes], model_json: str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (model.json's content, {weight name: array}) of the layers model at `model_json`.

    read_member: a file's bytes by its path (in a folder or a tarball; shard paths are relative to model.json's).
    """
    try:
        model = json.loads(read_member(model_json))
        groups = model["weightsManifest"]
    except (KeyError, TypeError, ValueError) as exc:
        raise TfjsFormatError(f"{model_json} is not a TF.js layers model's manifest ({exc!r})") from None
    if model.get("format") != "layers-model":
        raise TfjsFormatError(f"{model_json} has format {model.get('format')!r}, not 'layers-model'")
    folder = posixpath.dirname(model_json)
    weights: dict[str, np.ndarray] = {}
    for group in groups:
        data = b"".join(read_member(posixpath.join(folder, path)) for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            name, shape, dtype = spec["name"], tuple(spec["shape"]), spec["dtype"]
            if "quantization" in spec or dtype not in DTYPES:
                raise TfjsFormatError(f"weight {name} is stored as {spec.get('quantization') or dtype}, which this reader doesn't read")
            if name in weights:
                raise TfjsFormatError(f"weight {name} is listed twice")
            size = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            if offset + size > len(data):
                raise TfjsFormatError(f"the shards of {model_json} end inside weight {name}")
            weights[name] = np.frombuffer(data, DTYPES[dtype], count=size // DTYPES[dtype].itemsize, offset=offset).reshape(shape).copy()
            offset += size
        if offset != len(data):
            raise TfjsFormatError(f"the shards of {model_json} hold {len(data) - offset:,} bytes more than its weights")
    return model, weights
