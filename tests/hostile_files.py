"""A corpus of bad and odd image files, generated in memory (deterministic, about a second).

    hostile_files() -> {file name: (file bytes, expected outcome)}

The outcome is CAPTION (the app must caption it) or ERROR (the app must answer with
an InvalidImageError sentence). File names carry a fitting extension, so
`write_hostile_files(folder)` can put the corpus on disk for app and browser tests.
The comment on each entry says what it is and why it ends the way it does.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.image import MAX_FILE_BYTES

CAPTION, ERROR = "caption", "error"

# Colours the decoded-image tests look for.
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
ROTATED_STORED_SIZE = (64, 32)  # exif_rotated.jpg as stored; orientation 6 displays it 32x64
LARGEST_LEGAL_SIZE = (7000, 5714)  # largest_legal.png: 39,998,000 pixels, just under MAX_PIXELS


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, CAPTION or ERROR)}; a fresh dict of the cached corpus."""
    return dict(_corpus())


def write_hostile_files(folder: Path) -> dict[str, Path]:
    """Write the corpus into `folder`; returns {file name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (data, _) in _corpus().items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@functools.lru_cache(maxsize=1)
def _corpus() -> dict[str, tuple[bytes, str]]:
    jpeg = _encode(_picture(96, 64), "JPEG", quality=90)
    png = _encode(_picture(96, 64), "PNG")
    gif = _encode(_picture(96, 64).convert("P"), "GIF")
    largest_width, largest_height = LARGEST_LEGAL_SIZE
    return {
        # --- not images at all: "not an image in a format we can read" ---
        "empty.jpg": (b"", ERROR),
        "plain_text.txt": (b"This is a caption, not a picture.\n" * 20, ERROR),
        "page.html": (b"<!DOCTYPE html><html><body><script>alert(1)</script><img src=x></body></html>\n", ERROR),
        # SVG is text XML, which Pillow can't rasterise; it gets its own message.
        "drawing.svg": (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle r="30"/></svg>\n',
            ERROR,
        ),
        "random_bytes.bin": (np.random.default_rng(0).bytes(4096), ERROR),
        # Formats Pillow could read but the app doesn't accept (see ACCEPTED_FORMATS):
        # EPS would run Ghostscript; ICO decodes its embedded PNG while opening.
        "postscript.eps": (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n",
            ERROR,
        ),
        "icon.ico": (_encode(_picture(32, 32), "ICO", sizes=[(32, 32)]), ERROR),
        # --- damaged files ---
        "truncated.jpg": (jpeg[: len(jpeg) // 2], ERROR),  # LOAD_TRUNCATED_IMAGES is off
        "truncated.png": (png[: len(png) // 2], ERROR),
        "zero_width.png": (_png(0, 16, _deflated_zeros(16)), ERROR),  # IHDR says 0 pixels wide
        "bad_header_crc.png": (_break_crc(png, b"IHDR"), ERROR),  # Pillow checks header chunk CRCs
        # Pillow doesn't check IDAT CRCs; zlib's own checksum still guards the pixel data.
        "bad_idat_crc.png": (_break_crc(png, b"IDAT"), CAPTION),
        # Inverted bytes in the entropy-coded data: libjpeg-turbo warns about corrupt data
        # and decodes garbage blocks to the end, which is still an image.
        "corrupted_middle.jpg": (_corrupt_middle(_encode(_picture(256, 256), "JPEG", quality=90)), CAPTION),
        # EXIF claiming 48 entries, cut off 2 bytes into the first: Pillow warns and reads no tags.
        "truncated_exif.jpg": (
            _encode(_picture(96, 64), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x30\x01\x12"),
            CAPTION,
        ),
        # Orientation 6 next to a tag of the wrong type (DotRange as a fraction), which makes
        # ImageOps.exif_transpose raise: still shown rotated, like exif_rotated.jpg.
        "broken_exif.jpg": (
            _encode(_left_right(RED, BLUE, ROTATED_STORED_SIZE), "JPEG", quality=95, exif=_exif_with_wrong_tag_type(6)),
            CAPTION,
        ),
        # --- too large: "The image is too large" / "The file is larger than 20 MB" ---
        # 30000x30000 claimed by a 74-byte file: Pillow's DecompressionBombError (> 179 MP) at open.
        "bomb_header_only.png": (_png(30000, 30000, zlib.compress(bytes(1000))), ERROR),
        # The same size as a complete, valid PNG of zeros (870 KB): refused before decoding.
        "bomb_30000x30000.png": (_png(30000, 30000, _deflated_zeros(30000 * 30001)), ERROR),
        # 100 MP: in Pillow's warning range (89-179 MP), which load_image turns into an error.
        "bomb_100mp.png": (_png(10000, 10000, _deflated_zeros(10000 * 10001)), ERROR),
        # 48 MP: legal for Pillow, refused by our MAX_PIXELS (40 MP).
        "over_max_pixels.png": (_png(8000, 6000, _deflated_zeros(6000 * 8001)), ERROR),
        "bomb_header.jpg": (_with_jpeg_size(jpeg, 65500, 65500), ERROR),
        "bomb_screen.gif": (gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:], ERROR),  # GIF logical screen 65535x65535
        # An ICO whose 32x32 entry is really an 8000x6000 PNG (48 MP).
        "bomb_inside.ico": (_ico_around_png(_png(8000, 6000, _deflated_zeros(6000 * 8001))), ERROR),
        # A valid PNG padded past MAX_FILE_BYTES: only the size check refuses it.
        "over_max_file_bytes.png": (png + bytes(MAX_FILE_BYTES + 1 - len(png)), ERROR),
        # --- floods of tiny parts that Pillow parses one by one in Python (MAX_READS) ---
        "chunk_flood.png": (_png(8, 8, _deflated_zeros(8 * 9), before_idat=_png_chunk(b"abCd", b"") * 1_000_000), ERROR),
        "marker_flood.jpg": (jpeg[:2] + b"\xff\xfe\x00\x02" * 4_000_000 + jpeg[2:], ERROR),  # 4M empty comments
        "subblock_flood.gif": (_gif_with_comment_blocks(gif, 8_000_000), ERROR),
        # 2,000 colour profiles (2 MB), each inflating to 1 MiB: Pillow inflates every one, 3 s unchecked.
        "iccp_flood.png": (_png(8, 8, _deflated_zeros(8 * 9), before_idat=_iccp_chunk(2**20 - 1) * 2000), ERROR),
        # A 5 MB comment in 20,000 full sub-blocks, which Pillow joins one by one (quadratic): 9 s unchecked.
        "comment_flood.gif": (_gif_with_comment_blocks(gif, 20_000, block_size=255), ERROR),
        # 4 million one-pixel RLE runs (8 MB), which Pillow decodes in Python: 3-7 s unchecked.
        "run_flood.bmp": (_rle8_bmp(7000, 5714, b"\x01\x80" * 4_000_000 + _rle8_skip_rows(5713)), ERROR),
        # 5000 copies of a progressive JPEG's last scan (330 KB): libjpeg redoes a pass over
        # the image for each, 12 s unchecked; refused by MAX_JPEG_SCAN_PIXELS.
        "scan_flood.jpg": (
            _repeat_last_scan(_encode(Image.new("RGB", (2000, 1500), BLUE), "JPEG", progressive=True), 5000),
            ERROR,
        ),
        # 2 million one-row strips: Pillow's own TIFF reader took a minute; libtiff well under a second.
        "strip_flood.tif": (_tiff_with_strips(2_000_000), CAPTION),
        # --- odd but valid: captioned ---
        "tiny_1x1.png": (_encode(Image.new("RGB", (1, 1), RED), "PNG"), CAPTION),
        "tall_1x5000.png": (_encode(_picture(1, 5000), "PNG"), CAPTION),
        "wide_5000x1.png": (_encode(_picture(5000, 1), "PNG"), CAPTION),
        # 40 million pixels in one row: resizing it without box reduction first takes 3-4 s and 600 MB of filter weights.
        "row_40000000x1.png": (_png(40_000_000, 1, _deflated_zeros(40_000_001)), CAPTION),
        # The most pixels accepted, as a 117 KB all-black PNG: the slowest legal decode.
        "largest_legal.png": (
            _png(largest_width, largest_height, _deflated_zeros(largest_height * (3 * largest_width + 1)), colour_type=2),
            CAPTION,
        ),
        # A phone-sized progressive JPEG: decoded at 1/4 scale (draft) when captioned.
        "phone_progressive.jpg": (
            _encode(_picture(400, 300).resize((4000, 3000)), "JPEG", quality=85, progressive=True),
            CAPTION,
        ),
        "bilevel.png": (_encode(_picture(96, 64).convert("1"), "PNG"), CAPTION),
        "grey.jpg": (_encode(_picture(96, 64).convert("L"), "JPEG"), CAPTION),
        "cmyk.jpg": (_encode(_picture(96, 64).convert("CMYK"), "JPEG"), CAPTION),
        # Grey + alpha: left half fully transparent (-> white), right half opaque black.
        "grey_alpha.png": (_encode(_grey_half_transparent(), "PNG"), CAPTION),
        # Palette with a transparent index: left half transparent (-> white), right half blue.
        "palette_transparent.png": (_encode(_palette_half_transparent(), "PNG"), CAPTION),
        # RGB with a tRNS colour key: the red left half is transparent (-> white), right half blue.
        "colour_key.png": (_encode(_left_right(RED, BLUE), "PNG", transparency=RED), CAPTION),
        # 16-bit grey ramp 0..65535 (Pillow mode I;16): must span 0..255, not clip to 255.
        "grey16.png": (_encode(Image.fromarray(np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (16, 1))), "PNG"), CAPTION),
        # Red at 16 bits per channel, built by hand (Pillow reads it as 8-bit RGB).
        "rgb48.png": (
            _png(16, 16, zlib.compress((b"\x00" + b"\xff\xff\x00\x00\x00\x00" * 16) * 16), colour_type=2, bit_depth=16),
            CAPTION,
        ),
        # 32-bit float ramp -1000..1000 (mode F) with a NaN and an infinity in it.
        "float32.tif": (_encode(_float_ramp(), "TIFF"), CAPTION),
        "rgb.tif": (_encode(_picture(96, 64), "TIFF", compression="tiff_deflate"), CAPTION),
        "rgb.bmp": (_encode(_picture(96, 64), "BMP"), CAPTION),
        # An RLE-compressed 64x64 grey BMP: 8 runs of 8 pixels a row (Pillow can't write these).
        "rle8.bmp": (_rle8_bmp(64, 64, b"".join(_rle8_row(y) for y in range(64)) + b"\x00\x01"), CAPTION),
        "lossy.webp": (_encode(_picture(96, 64), "WEBP", quality=80), CAPTION),
        "still.avif": (_encode(_picture(64, 64), "AVIF", quality=60, speed=10), CAPTION),
        # Stored 64x32 (left red, right blue) with EXIF orientation 6: shown 32x64, red on top.
        "exif_rotated.jpg": (
            _encode(_left_right(RED, BLUE, ROTATED_STORED_SIZE), "JPEG", quality=95, exif=_orientation_exif(6)),
            CAPTION,
        ),
        # Animations: frames red, green, blue; the caption is of the red first frame.
        "animated.gif": (_animation("GIF"), CAPTION),
        "animated.webp": (_animation("WEBP", lossless=True), CAPTION),
        "animated.png": (_animation("PNG"), CAPTION),
        # Polyglots: Pillow reads the image and ignores what follows its end marker.
        "polyglot_gif_zip.gif": (gif + _zip_with_html(), CAPTION),
        "polyglot_jpeg_script.jpg": (jpeg + b"<script>alert(document.cookie)</script>", CAPTION),
    }


# ---- building blocks ------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _picture(width: int, height: int) -> Image.Image:
    """A smooth colour pattern: red ramps left to right, green top to bottom, blue in rings."""
    x = np.linspace(0, 1, width, dtype=np.float32)[np.newaxis, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, np.newaxis]
    blue = 0.5 + 0.5 * np.cos(12 * np.hypot(x - 0.5, y - 0.5))
    rgb = np.stack(np.broadcast_arrays(x, y, blue), axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _left_right(left: tuple, right: tuple, size: tuple[int, int] = (32, 16)) -> Image.Image:
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def _grey_half_transparent() -> Image.Image:
    """Mode LA: black, with the left half fully transparent."""
    alpha = Image.new("L", (32, 16), 255)
    alpha.paste(0, (0, 0, 16, 16))
    return Image.merge("LA", (Image.new("L", (32, 16), 0), alpha))


def _palette_half_transparent() -> Image.Image:
    image = Image.new("P", (32, 16), 1)
    image.putpalette([0, 0, 0] + list(BLUE))
    image.paste(0, (0, 0, 16, 16))
    image.info["transparency"] = 0
    return image


def _float_ramp() -> Image.Image:
    ramp = np.tile(np.linspace(-1000, 1000, 64, dtype=np.float32), (16, 1))
    ramp[0, 0], ramp[0, 1] = np.nan, np.inf
    return Image.fromarray(ramp, "F")


def _orientation_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _exif_with_wrong_tag_type(orientation: int) -> bytes:
    """Big-endian EXIF: Orientation (SHORT), then DotRange (a BYTE tag) as a RATIONAL 1/1."""
    rational_at = 8 + 2 + 2 * 12 + 4
    entries = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">HHII", 0x0150, 5, 1, rational_at)
    return b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, 2) + entries + struct.pack(">III", 0, 1, 1)


def _animation(fmt: str, **options) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    if fmt == "GIF":
        frames = [frame.convert("P") for frame in frames]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)


def _zip_with_html() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("index.html", date_time=(2020, 1, 1, 0, 0, 0)), "<script>alert(1)</script>")
    return buffer.getvalue()


def _corrupt_middle(jpeg: bytes) -> bytes:
    """Invert 64 bytes in the middle of the compressed data (0xFF bytes stay, so no new markers appear)."""
    middle = len(jpeg) // 2
    corrupted = bytearray(jpeg)
    for i in range(middle, middle + 64):
        if corrupted[i] not in (0x00, 0xFF):
            corrupted[i] ^= 0xFF
    return bytes(corrupted)


def _with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Rewrite the baseline frame header (SOF0) to claim another size."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def _repeat_last_scan(jpeg: bytes, copies: int) -> bytes:
    """Insert `copies` more copies of the last scan (start-of-scan marker to end-of-image)."""
    last_scan, end = jpeg.rindex(b"\xff\xda"), jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[last_scan:end] * copies + jpeg[end:]


def _gif_with_comment_blocks(gif: bytes, count: int, block_size: int = 1) -> bytes:
    """Insert one comment extension made of `count` data sub-blocks of `block_size` bytes before the image."""
    flags = gif[10]
    after_palette = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global palette
    sub_block = bytes([block_size]) + b"a" * block_size
    return gif[:after_palette] + b"\x21\xfe" + sub_block * count + b"\x00" + gif[after_palette:]


def _iccp_chunk(profile_bytes: int) -> bytes:
    """A PNG iCCP chunk whose (zero-filled) profile inflates to `profile_bytes`."""
    return _png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(profile_bytes), 9))


def _tiff_with_strips(count: int) -> bytes:
    """An uncompressed 1 x `count` grey TIFF with one row per strip, all strips pointing at one byte."""
    tags = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, 1),  # ImageWidth
        (257, 4, 1, count),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, count, 0),  # StripOffsets (value: filled in below)
        (278, 4, 1, 1),  # RowsPerStrip
        (279, 4, count, 0),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * count
    pixel_at = counts_at + 4 * count
    values = {273: offsets_at, 279: counts_at}
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, n, values.get(tag, value)) for tag, kind, n, value in tags
    )
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + ifd
        + struct.pack("<I", 0)
        + np.full(count, pixel_at, "<u4").tobytes()
        + np.ones(count, "<u4").tobytes()
        + b"\x80"
    )


def _rle8_bmp(width: int, height: int, runs: bytes) -> bytes:
    """An 8-bit grey BMP with RLE8-compressed pixel data `runs`."""
    palette = b"".join(bytes((level, level, level, 0)) for level in range(256))
    pixels_at = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 2835, 2835, 256, 0)  # compression 1: RLE8
    return b"BM" + struct.pack("<IHHI", pixels_at + len(runs), 0, 0, pixels_at) + info + palette + runs


def _rle8_row(y: int) -> bytes:
    """Eight runs of eight pixels, then end of line."""
    return b"".join(bytes((8, (32 * x + 4 * y) % 256)) for x in range(8)) + b"\x00\x00"


def _rle8_skip_rows(rows: int) -> bytes:
    """RLE8 'delta' escapes that move down `rows` rows (at most 255 each), leaving them black."""
    full, rest = divmod(rows, 255)
    return b"\x00\x02\x00\xff" * full + bytes((0, 2, 0, rest))


def _ico_around_png(png: bytes) -> bytes:
    """An ICO file with one 32x32 directory entry whose data is `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 32, 32, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(
    width: int, height: int, compressed_scanlines: bytes, colour_type: int = 0, bit_depth: int = 8, before_idat: bytes = b""
) -> bytes:
    """A PNG built chunk by chunk, so it can claim any size. colour_type 0 is grey, 2 is RGB."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + before_idat
        + _png_chunk(b"IDAT", compressed_scanlines)
        + _png_chunk(b"IEND", b"")
    )


def _break_crc(png: bytes, kind: bytes) -> bytes:
    """Invert the CRC of the first `kind` chunk."""
    start = png.index(kind) - 4
    (length,) = struct.unpack(">I", png[start : start + 4])
    crc_at = start + 8 + length
    return png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at : crc_at + 4]) + png[crc_at + 4 :]


_ZEROS_BLOCK = 1 << 20


@functools.lru_cache(maxsize=1)
def _deflated_zero_block() -> bytes:
    # A full flush byte-aligns the output and resets the match history, so every
    # 1 MiB of zeros compresses to exactly these bytes, wherever it is in the stream.
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(_ZEROS_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)


def _deflated_zeros(count: int) -> bytes:
    """zlib.compress(bytes(count)), built in milliseconds even for gigabytes of zeros."""
    whole_blocks, rest = divmod(count, _ZEROS_BLOCK)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    ending = last.compress(bytes(rest)) + last.flush()  # ends with the final-block flag
    adler32 = ((count % 65521) << 16) | 1  # of zeros: the byte sum stays 1, the sum of sums grows by 1 a byte
    return b"\x78\xda" + _deflated_zero_block() * whole_blocks + ending + struct.pack(">I", adler32)
