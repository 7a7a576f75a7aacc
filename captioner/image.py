"""Image preparation: any user-supplied image -> the encoder's input array.

Training's feature extraction and the app call the same `load_image` and
`prepare_images`, so the model sees identical pixels in both.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse images above this many pixels before decoding them: a 100 KB PNG can
# claim 30000x30000 pixels and take gigabytes once decoded (a decompression bomb).
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 20 * 1024 * 1024

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a grey half-image


class InvalidImageError(ValueError):
    """The input can't be used as an image; the message is meant for the user."""


ImageInput = "Image.Image | str | Path | bytes | np.ndarray"


def load_image(image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `image` (PIL image, path, bytes or HxWx3 uint8 array) to an RGB PIL image.

    Applies EXIF orientation, takes the first frame of an animation and converts
    every mode to RGB (transparency composited over white).
    """
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image, max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidImageError(f"No image file at {path}.")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
        data = path.read_bytes()
    else:
        raise InvalidImageError(f"Expected an image, a file path, bytes or an array, got {type(image).__name__}.")

    if not data:
        raise InvalidImageError("The file is empty.")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError("This file is not an image in a format we can read (JPEG, PNG, GIF, WebP, BMP, TIFF).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large() from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise InvalidImageError(f"This image file is damaged and can't be read ({exc.__class__.__name__}).") from None
    return _to_rgb(opened, max_pixels)


def _too_large(size: tuple[int, int] | None = None) -> InvalidImageError:
    what = f" ({size[0]}x{size[1]})" if size else ""
    return InvalidImageError(f"The image is too large{what}: at most {MAX_PIXELS // 1_000_000} megapixels are accepted.")


def _to_rgb(image: Image.Image, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError("The image has no pixels.")
    if width * height > max_pixels:
        raise _too_large(image.size)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # first frame of a GIF/WebP/APNG animation
        image.load()
        image = ImageOps.exif_transpose(image)
        return _flatten_to_rgb(image)
    except InvalidImageError:
        raise
    except Exception as exc:  # truncated data, broken chunks, bad EXIF, ...
        raise InvalidImageError(f"This image file is damaged or incomplete and can't be read ({exc.__class__.__name__}).") from None


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the actual range instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _rgb_from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InvalidImageError(f"Expected an HxWx3 image array, got shape {array.shape}.")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise _too_large((array.shape[1], array.shape[0]))
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidImageError("The image has no pixels.")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmax(array, initial=0) <= 1.0:
            array = np.nan_to_num(array) * 255.0
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    mode = "RGBA" if array.shape[-1] == 4 else "RGB"
    return _flatten_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode))


def resize_for_encoder(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Squash (no crop) to the encoder's input size with bilinear filtering, as Keras' load_img does."""
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def prepare_images(images, size: tuple[int, int]) -> np.ndarray:
    """Decode and resize a list of images into one float32 batch (n, h, w, 3), pixel values 0..255.

    The encoder's own `preprocess_input` runs inside the encoder model (see model.py).
    """
    return np.stack([resize_for_encoder(load_image(image), size) for image in images])
