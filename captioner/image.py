"""Image preparation: any user-supplied image -> the encoder's input array.

Training's feature extraction and the app call the same `load_image` and
`prepare_images`, so the model sees identical pixels in both.

Uploads are untrusted: every failure to read one becomes an `InvalidImageError`
whose message is a sentence for the user, and the limits below bound the memory
and time a single file can cost.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, TiffImagePlugin, UnidentifiedImageError

# Refuse images above this many pixels before decoding them: a 100 KB PNG can
# claim 30000x30000 pixels and take gigabytes once decoded (a decompression bomb).
# 40 MP is above any phone camera's photos; it decodes in about a second.
MAX_PIXELS = 40_000_000
# The largest upload read at all; phone photos are 2-12 MB.
MAX_FILE_BYTES = 20 * 1024 * 1024
# Pillow parses PNG chunks, JPEG markers and GIF blocks in Python, and decodes
# RLE-compressed BMPs in Python, with a read() call or two for each part, at a few
# microseconds per call: a 20 MB file of a million empty chunks takes 10-20 s just to
# open. Pixel data is otherwise read in 64 KB blocks, so real files need a few thousand
# reads (a 20 MB PNG cut into 1 KB IDAT chunks: 60,000). The price: an RLE BMP of more
# than 50,000 runs is refused, and those are rare.
MAX_READS = 100_000
# libjpeg passes over the whole image once per progressive scan (50-75 ms at 40 MP here),
# and a 300 KB file can hold a thousand scans: over a minute. Encoders write 10 scans
# (libjpeg, Pillow) to about 20 (mozjpeg), more in multi-picture files. Allowed: the
# work of 40 scans of a MAX_PIXELS image, about 3 s; small images may have more scans.
MAX_JPEG_SCAN_PIXELS = 40 * MAX_PIXELS
JPEG_START_OF_SCAN = b"\xff\xda"  # in entropy-coded data a 0xFF byte is followed by 0x00 or a restart marker
# Pillow inflates every iCCP (colour profile), zTXt and iTXt chunk of a PNG, up to 1 MiB each, but
# doesn't bound how many there are: 2,000 iCCP chunks of 1 KB (2 MB) took 3 s, tens of thousands a
# minute. The PNG spec allows one iCCP; photo tools write one profile and a few compressed text chunks
# (EXIF, XMP, IPTC). Counted as their chunk names' occurrences in the file, an upper bound found at C speed.
MAX_PNG_COMPRESSED_CHUNKS = 16
PNG_COMPRESSED_CHUNK_NAMES = (b"iCCP", b"zTXt", b"iTXt")
# Pillow joins a GIF comment's sub-blocks (255 bytes at most each) one by one, copying the text so
# far every time: 20,000 sub-blocks (5 MB) took 9 s. Comments are a line of text; the total over all
# comment blocks, and the number of blocks, are bounded before decoding.
MAX_GIF_COMMENT_BYTES = 64 * 1024
MAX_GIF_COMMENTS = 256
# Large images are first shrunk by a cheap integer factor (JPEG DCT scaling while
# decoding, box averaging before resizing), but never below this multiple of the
# encoder's input size; the bilinear resize does the rest, so the result stays close
# to a full-quality resize. Images under 6x the input size (1344 px for 224) are not
# affected, so training's Flickr8k images (at most 500 px) get exactly the plain resize.
DOWNSCALE_GAP = 3
# Formats Pillow decodes that people upload as photos. The rest of Pillow's ~40
# readers are left out: rarely fuzzed parsers (PSD, FITS, ...), EPS (runs Ghostscript),
# ICO (decodes an embedded PNG of up to Pillow's own 89 MP limit while opening,
# before MAX_PIXELS can be checked) and JPEG 2000 (slow to decode). "JPEG" includes
# the multi-picture JPEGs (MPO) some cameras write.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, GIF, WebP, AVIF, BMP or TIFF"
# File names of those formats, for picking the images out of a folder (the example gallery, the batch job).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".avif", ".bmp", ".tif", ".tiff")
# How files of those formats begin (AVIF: "ftyp" at byte 4), to tell a damaged image
# from a file of another kind when Pillow can't identify it.
FORMAT_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a grey half-image
# Decode every TIFF with libtiff (C). Pillow's own reader of uncompressed TIFFs builds
# Python objects per strip before reading a byte: 2 million one-row strips (16 MB) take a minute.
TiffImagePlugin.READ_LIBTIFF = True

EXIF_ORIENTATION = 0x0112
TRANSPOSE_FOR_ORIENTATION = {  # EXIF orientation -> the transpose that displays the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

ImageInput = Image.Image | str | Path | bytes | np.ndarray


class InvalidImageError(ValueError):
    """The input can't be used as an image; the message is meant for the user."""


def load_image(image: ImageInput, max_pixels: int = MAX_PIXELS, target_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `image` (PIL image, path, bytes or HxWx3 array) to an RGB PIL image.

    Applies EXIF orientation, takes the first frame of an animation and converts
    every mode to RGB (transparency composited over white). With `target_size`
    (the size the caller resizes to), a JPEG file much larger than that is decoded
    at a reduced scale. Raises InvalidImageError for anything that can't be used.
    """
    if isinstance(image, np.ndarray):
        return _rgb_from_array(image, max_pixels)
    if isinstance(image, Image.Image):
        return _decode(image, max_pixels)
    return _decode(_open(read_image_bytes(image)), max_pixels, target_size)


def read_image_bytes(source) -> bytes:
    """A file's path (or its bytes) -> its bytes, read at most MAX_FILE_BYTES; InvalidImageError with the reason otherwise."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if not path.is_file():
                raise InvalidImageError(f"No image file at {path}.")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise _too_big_file()
            data = path.read_bytes()
        except OSError as exc:  # unreadable: permissions, a name too long, ...
            raise InvalidImageError(f"The file {path} can't be read ({exc.strerror or exc}).") from None
    else:
        raise InvalidImageError(f"Expected an image, a file path, bytes or an array, got {type(source).__name__}.")
    if not data:
        raise InvalidImageError("The file is empty.")
    if len(data) > MAX_FILE_BYTES:
        raise _too_big_file()
    return data


class _TooManyReads(Exception):
    """Raised by _ReadLimitedBytes; deliberately not a type Pillow catches and retries on."""


class _ReadLimitedBytes(io.BytesIO):
    """An in-memory file that allows MAX_READS read() calls (see MAX_READS for why)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads_left = MAX_READS

    def read(self, size: int | None = -1) -> bytes:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise _TooManyReads()
        return super().read(size)


def _open(data: bytes) -> Image.Image:
    """Identify the format and read the header; no pixels are decoded yet."""
    _refuse_metadata_floods(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(_ReadLimitedBytes(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        if data.startswith(FORMAT_SIGNATURES) or data[4:8] == b"ftyp":
            raise InvalidImageError("This image file is damaged and can't be read.") from None
        if b"<svg" in data[:4096].lower():
            raise InvalidImageError(f"SVG drawings aren't supported; please upload a photo ({FORMAT_NAMES}).") from None
        raise InvalidImageError(f"This file is not an image in a format we can read ({FORMAT_NAMES}).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large() from None
    except _TooManyReads:
        raise _too_many_parts() from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise InvalidImageError(f"This image file is damaged and can't be read ({exc.__class__.__name__}).") from None
    if image.format in ("JPEG", "MPO") and data.count(JPEG_START_OF_SCAN) * image.width * image.height > MAX_JPEG_SCAN_PIXELS:
        raise InvalidImageError("This JPEG file is malformed (it has far too many progressive scans) and can't be read.")
    return image


def _refuse_metadata_floods(data: bytes) -> None:
    """Refuse PNG and GIF files whose metadata would make Pillow work for seconds (see the limits above)."""
    if data.startswith(b"\x89PNG"):
        if sum(data.count(name) for name in PNG_COMPRESSED_CHUNK_NAMES) > MAX_PNG_COMPRESSED_CHUNKS:
            raise InvalidImageError("This PNG file is malformed (it has far too many compressed metadata chunks) and can't be read.")
    elif data.startswith(b"GIF8"):
        comments, comment_bytes = _gif_comment_sizes(data)
        if comments > MAX_GIF_COMMENTS or comment_bytes > MAX_GIF_COMMENT_BYTES:
            raise InvalidImageError("This GIF file is malformed (its comments are far too long) and can't be read.")


def _gif_comment_sizes(data: bytes) -> tuple[int, int]:
    """(comment blocks, comment bytes) in a GIF, found by walking its block structure.

    Stops at the trailer, at anything that isn't a GIF block (Pillow then says the file is damaged) or
    after MAX_READS sub-blocks (refused as a flood of parts, as Pillow's reads would be).
    """
    def colour_table_size(flags: int) -> int:
        return 3 << ((flags & 7) + 1) if flags & 0x80 else 0

    comments = comment_bytes = sub_blocks = 0
    at = 13 + colour_table_size(data[10]) if len(data) > 10 else len(data)  # header, screen descriptor, palette
    while at < len(data):
        introducer = data[at]
        if introducer == 0x21 and at + 1 < len(data):  # extension: label, then sub-blocks
            is_comment = data[at + 1] == 0xFE
            comments += is_comment
            at += 2
        elif introducer == 0x2C and at + 9 < len(data):  # image: descriptor, palette, LZW code size, sub-blocks
            is_comment = False
            at += 10 + colour_table_size(data[at + 9]) + 1
        else:  # 0x3B, the trailer, or not a GIF block
            break
        while at < len(data) and data[at]:  # sub-blocks: a length byte, then that many bytes; 0 ends them
            sub_blocks += 1
            if sub_blocks > MAX_READS:
                raise _too_many_parts()
            if is_comment:
                comment_bytes += data[at]
            at += data[at] + 1
        at += 1
    return comments, comment_bytes


def _decode(image: Image.Image, max_pixels: int, target_size: tuple[int, int] | None = None) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError("The image has no pixels.")
    if width * height > max_pixels:
        raise _too_large(image.size)
    try:
        if image.tell() != 0:
            # First frame of an animation. Only seek when needed: asking `is_animated`
            # reads on into frame 1, and a broken later frame shouldn't reject a good first one.
            image.seek(0)
        if target_size:
            side = DOWNSCALE_GAP * max(target_size)  # square: EXIF rotation is applied after decoding
            image.draft(None, (side, side))  # JPEG only; a no-op for other formats
        image.load()
        return _flatten_to_rgb(_apply_exif_orientation(image))
    except _TooManyReads:
        raise _too_many_parts() from None
    except MemoryError:
        raise InvalidImageError("There isn't enough memory free to decode this image; please try a smaller one.") from None
    except Exception as exc:  # truncated data, broken chunks, ...
        reason = exc.__class__.__name__
        raise InvalidImageError(f"This image file is damaged or incomplete and can't be read ({reason}).") from None


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # Not ImageOps.exif_transpose: it also rewrites the EXIF block for the rotated copy,
    # which raises on EXIF that parses but won't re-serialise (a tag of the wrong type).
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unparseable EXIF; the pixels themselves are fine, so keep them as stored
        return image
    method = TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _too_large(size: tuple[int, int] | None = None) -> InvalidImageError:
    what = f" ({size[0]}x{size[1]})" if size else ""
    return InvalidImageError(f"The image is too large{what}: at most {MAX_PIXELS // 1_000_000} megapixels are accepted.")


def _too_big_file() -> InvalidImageError:
    return InvalidImageError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")


def _too_many_parts() -> InvalidImageError:
    return InvalidImageError("This image file is malformed (it has far too many internal chunks) and can't be read.")


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _stretch_to_rgb(image)
    if "transparency" in image.info:  # palette index or colour key -> a real alpha channel
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def _stretch_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8 bits by the finite value range (converting would clip at 255)."""
    pixels = np.array(image, dtype=np.float32)  # float32 holds 16-bit values exactly, at half float64's memory
    finite = np.isfinite(pixels)
    low = float(pixels.min(where=finite, initial=np.inf))
    high = float(pixels.max(where=finite, initial=-np.inf))
    if not high > low:  # a single value, or nothing finite
        return Image.new("RGB", image.size)
    np.nan_to_num(pixels, copy=False, nan=low, posinf=high, neginf=low)
    with np.errstate(over="ignore"):  # a range wider than float32 overflows to inf, clipped below
        pixels -= low
        pixels *= 255.0 / (high - low)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


def _rgb_from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise InvalidImageError(f"Expected an HxWx3 image array, got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(f"Expected an array of pixel values, got dtype {array.dtype}.")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise InvalidImageError("The image has no pixels.")
    if height * width > max_pixels:
        raise _too_large((width, height))
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and np.nanmax(array, initial=0) <= 1.0:
            array = np.nan_to_num(array) * 255.0  # floats in 0..1
        array = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., np.newaxis]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    mode = "RGBA" if array.shape[-1] == 4 else "RGB"
    return _flatten_to_rgb(Image.fromarray(np.ascontiguousarray(array), mode))


def resize_for_encoder(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Squash (no crop) to the encoder's input size with bilinear filtering, as Keras' load_img does: (h, w, 3) uint8.

    Images over 2 * DOWNSCALE_GAP times `size` are box-reduced first (see DOWNSCALE_GAP):
    this bounds the filter's memory and time for extreme shapes such as 40,000,000x1.
    """
    if image.size != size:
        image = image.resize(size, Image.BILINEAR, reducing_gap=DOWNSCALE_GAP)
    return np.asarray(image)  # uint8: what the decode workers send (floats cost a third of a 224x224 JPEG's decode)


def fit_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w, 3) uint8 pixels -> the same images at `size` (width, height), resized as the decode workers resize
    (resize_for_encoder): how an ensemble's member with another input size gets the pixels made for the ensemble."""
    pixels = np.asarray(pixels)
    width, height = size
    if pixels.shape[1:3] == (height, width):
        return pixels
    if not len(pixels):
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack([resize_for_encoder(Image.fromarray(image), (width, height)) for image in pixels])


def display_copy(photo: Image.Image, max_side: int) -> Image.Image:
    """The photo to show a user (heatmap overlays, galleries): its aspect kept, shrunk to at most max_side
    pixels a side, never enlarged. (The encoder's copy is squashed to a square: resize_for_encoder.)"""
    if max(photo.size) <= max_side:
        return photo
    scale = max_side / max(photo.size)
    size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
    return photo.resize(size, Image.BILINEAR, reducing_gap=DOWNSCALE_GAP)


def prepare_pixels(image: ImageInput, size: tuple[int, int]) -> np.ndarray:
    """Decode and resize one image for the encoder: (h, w, 3) uint8, the values prepare_images gives as floats.

    What a decode worker (sandbox.py) sends back; `Captioner.caption` takes the array as it is.
    """
    return resize_for_encoder(load_image(image, target_size=size), size)


def prepare_images(images, size: tuple[int, int]) -> np.ndarray:
    """Decode and resize a list of images into one float32 batch (n, h, w, 3), pixel values 0..255.

    The encoder's own `preprocess_input` follows in ImageEncoder.encode_pixels (encoder.py).
    """
    return np.stack([resize_for_encoder(load_image(image, target_size=size), size) for image in images]).astype(np.float32)
