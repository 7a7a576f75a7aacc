"""Hostile and odd inputs: every file is captioned or refused with a sentence for the user, quickly.

The corpus is in hostile_files.py. Timing assertions are loose (TIME_LIMIT) because the
CPU is shared; run with --durations=10 to see the slowest cases.
"""

from __future__ import annotations

import io
import re
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from captioner import Caption, InvalidImageError, load_image
from captioner.image import MAX_PIXELS, prepare_images, prepare_pixels
from captioner.sandbox import DecodePool
from tests.hostile_files import (
    BLUE,
    CAPTION,
    ERROR,
    LARGEST_LEGAL_SIZE,
    RED,
    ROTATED_STORED_SIZE,
    WHITE,
    _deflated_zeros,
    hostile_files,
    write_hostile_files,
)

CORPUS = hostile_files()
TIME_LIMIT = 10.0  # seconds per file, decode and caption; the worst file measures about 1-2 s
ENCODER_SIZE = (224, 224)


@pytest.fixture(scope="module")
def corpus_paths(tmp_path_factory):
    return write_hostile_files(tmp_path_factory.mktemp("hostile"))


def assert_user_sentence(message: str) -> None:
    assert "Traceback" not in message and "\n" not in message, message
    assert re.fullmatch(r"[A-Z][^\n]*\.", message), f"not a sentence: {message!r}"
    assert len(message.split()) >= 4, f"too terse for a user: {message!r}"


def caption_outcome(captioner, source) -> str:
    """CAPTION or ERROR, after checking the result's shape and the time it took."""
    start = time.perf_counter()
    try:
        caption = captioner.caption(source)
    except InvalidImageError as exc:
        assert_user_sentence(str(exc))
        outcome = ERROR
    else:
        assert isinstance(caption, Caption) and caption.text.strip()
        outcome = CAPTION
    assert time.perf_counter() - start < TIME_LIMIT
    return outcome


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 24
    assert {CAPTION, ERROR} == {outcome for _, outcome in CORPUS.values()}


@pytest.mark.parametrize("name", CORPUS)
def test_caption_from_bytes(tiny_captioner, name):
    data, expected = CORPUS[name]
    assert caption_outcome(tiny_captioner, data) == expected


@pytest.mark.parametrize("name", CORPUS)
def test_caption_from_path(tiny_captioner, corpus_paths, name):
    assert caption_outcome(tiny_captioner, corpus_paths[name]) == CORPUS[name][1]


@pytest.fixture(scope="module")
def decode_pool():
    with DecodePool() as pool:
        yield pool.wait_ready()


@pytest.mark.parametrize("name", CORPUS)
def test_decode_workers_give_what_in_process_decoding_gives(decode_pool, name):
    """The app's path (captioner/sandbox.py): the same pixels, or the same sentence, as the library in-process."""
    data, expected = CORPUS[name]
    outcomes = []
    for prepare in (prepare_pixels, decode_pool.prepare_pixels):
        try:
            outcomes.append(prepare(data, ENCODER_SIZE))
        except InvalidImageError as exc:
            outcomes.append(str(exc))
    in_process, in_worker = outcomes
    if expected == CAPTION:
        assert in_process.shape == (*ENCODER_SIZE[::-1], 3) and in_process.dtype == np.uint8
        np.testing.assert_array_equal(in_worker, in_process)
    else:
        assert in_worker == in_process
    assert decode_pool.replaced == 0  # no file in the corpus gets near the deadline or the memory limit


# ---- what the decoded images look like ---------------------------------------------------


def decoded(name: str, **options) -> Image.Image:
    image = load_image(CORPUS[name][0], **options)
    assert image.mode == "RGB"
    return image


def assert_colour(actual, expected, tolerance=40):
    assert max(abs(a - e) for a, e in zip(actual, expected)) <= tolerance, f"{actual} is not {expected}"


@pytest.mark.parametrize("name", ["exif_rotated.jpg", "broken_exif.jpg"])
def test_exif_orientation_is_applied(name):
    image = decoded(name)
    width, height = ROTATED_STORED_SIZE
    assert image.size == (height, width)
    assert_colour(image.getpixel((height // 2, 2)), RED)  # the stored left half ends up on top
    assert_colour(image.getpixel((height // 2, width - 3)), BLUE)


@pytest.mark.parametrize(
    "name, left, right",
    [("grey_alpha.png", WHITE, (0, 0, 0)), ("palette_transparent.png", WHITE, BLUE), ("colour_key.png", WHITE, BLUE)],
)
def test_transparency_is_composited_over_white(name, left, right):
    image = decoded(name)
    assert image.getpixel((2, 8)) == left
    assert image.getpixel((29, 8)) == right


def test_16_bit_grey_is_scaled_not_clipped():
    row = np.asarray(decoded("grey16.png"))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert abs(int(row[128]) - 128) <= 2
    assert len(np.unique(row)) > 200


def test_float_image_is_scaled_and_nan_safe():
    pixels = np.asarray(decoded("float32.tif"))
    ramp = pixels[1, :, 0]
    assert ramp[0] == 0 and ramp[-1] == 255 and np.all(np.diff(ramp.astype(int)) >= 0)
    assert pixels[0, 0, 0] == 0 and pixels[0, 1, 0] == 255  # NaN -> the lowest value, +inf -> the highest


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp", "animated.png", "tiny_1x1.png", "rgb48.png"])
def test_colour_of_first_frame_and_odd_encodings(name):
    assert decoded(name).getpixel((0, 0)) == RED


def test_later_frame_of_an_opened_animation_is_rewound():
    animation = Image.open(io.BytesIO(CORPUS["animated.gif"][0]))
    animation.seek(2)  # blue
    assert load_image(animation).getpixel((0, 0)) == RED


def test_cmyk_and_grey_look_like_their_source():
    source = np.asarray(Image.open(io.BytesIO(CORPUS["rgb.bmp"][0])), dtype=float)
    assert np.abs(np.asarray(decoded("cmyk.jpg"), dtype=float) - source).mean() < 8
    grey = np.asarray(decoded("grey.jpg"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_extreme_sizes_decode_in_full():
    assert decoded("largest_legal.png").size == LARGEST_LEGAL_SIZE
    assert decoded("row_40000000x1.png").size == (40_000_000, 1)
    assert prepare_images([CORPUS["row_40000000x1.png"][0]], ENCODER_SIZE).shape == (1, 224, 224, 3)


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty.jpg", "is empty"),
        ("plain_text.txt", "not an image in a format we can read"),
        ("drawing.svg", "SVG drawings aren't supported"),
        ("icon.ico", "not an image in a format we can read"),
        ("bad_header_crc.png", "damaged"),
        ("truncated.png", "damaged or incomplete"),
        ("over_max_pixels.png", "too large .8000x6000.: at most 40 megapixels"),
        ("bomb_30000x30000.png", "too large: at most 40 megapixels"),
        ("over_max_file_bytes.png", "larger than 20 MB"),
        ("chunk_flood.png", "far too many internal chunks"),
        ("scan_flood.jpg", "far too many progressive scans"),
        ("iccp_flood.png", "far too many compressed metadata chunks"),
        ("comment_flood.gif", "comments are far too long"),
    ],
)
def test_error_messages_say_what_is_wrong(name, words):
    with pytest.raises(InvalidImageError, match=words):
        load_image(CORPUS[name][0])


def test_over_max_pixels_is_a_real_image_pillow_would_decode():
    """So it's MAX_PIXELS that refuses it, not a defect in the file."""
    image = Image.open(io.BytesIO(CORPUS["over_max_pixels.png"][0]))
    assert image.width * image.height > MAX_PIXELS
    image.load()
    assert image.getextrema() == (0, 0)


def test_deflated_zeros_is_a_valid_zlib_stream():
    count = 3 * 2**20 + 12345
    assert zlib.decompress(_deflated_zeros(count)) == bytes(count)


# ---- reduced-size decoding and resizing of large images ----------------------------------


def jpeg_bytes(width: int, height: int) -> bytes:
    x = np.linspace(0, 255, width)[np.newaxis, :]
    y = np.linspace(0, 255, height)[:, np.newaxis]
    pixels = np.stack(np.broadcast_arrays(x, y, (x + y) / 2), axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def full_quality(data: bytes) -> np.ndarray:
    """Full decode and one bilinear resize: what prepare_images did before draft and reducing_gap."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize(ENCODER_SIZE, Image.BILINEAR), dtype=np.float32)


@pytest.mark.parametrize("size", [(224, 224), (500, 375), (448, 448), (1343, 1343), (1343, 400)])
def test_images_up_to_6x_the_encoder_size_are_prepared_exactly_as_before(size):
    data = jpeg_bytes(*size)
    np.testing.assert_array_equal(prepare_images([data], ENCODER_SIZE)[0], full_quality(data))


def test_large_jpeg_is_drafted_and_close_to_full_quality():
    data = jpeg_bytes(4032, 3024)  # a 12 MP phone photo
    assert load_image(data, target_size=ENCODER_SIZE).size == (1008, 756)  # DCT-scaled 1/4 while decoding
    assert load_image(data).size == (4032, 3024)
    difference = np.abs(prepare_images([data], ENCODER_SIZE)[0] - full_quality(data))
    assert difference.mean() < 1.0 and difference.max() < 8


def test_large_png_is_box_reduced_close_to_full_quality():
    image = Image.fromarray(np.asarray(Image.open(io.BytesIO(jpeg_bytes(2000, 1500)))))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    difference = np.abs(prepare_images([buffer.getvalue()], ENCODER_SIZE)[0] - full_quality(buffer.getvalue()))
    assert difference.mean() < 1.0 and difference.max() < 8


# ---- other inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "x" * 5000,  # a file name too long for the OS
        "no/such/file.jpg",
        "embedded\0null.png",
        ".",  # a directory
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 3), np.complex64),
        np.zeros((4, 4, 3), object),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((8000, 6000), np.uint8),  # 48 MP
        12345,
    ],
    ids=[
        "long_name",
        "missing",
        "null_byte",
        "directory",
        "two_channels",
        "complex",
        "object",
        "empty_array",
        "huge_array",
        "int",
    ],
)
def test_other_bad_inputs(source):
    with pytest.raises(InvalidImageError) as raised:
        load_image(source)
    assert_user_sentence(str(raised.value))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_inputs(wrap):
    assert load_image(wrap(CORPUS["tiny_1x1.png"][0])).getpixel((0, 0)) == RED


@pytest.mark.parametrize("array", [np.full((4, 4), 2.0), np.full((4, 4, 3), np.nan), np.full((4, 4, 4), -7, np.int64)])
def test_odd_arrays_are_still_images(array):
    assert load_image(array).size == (4, 4)


# ---- fuzzing -----------------------------------------------------------------------------


def _fuzz_seed_jpeg() -> bytes:
    """A small JPEG with EXIF (orientation and a string tag), so mutations reach EXIF parsing too."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(48, 32))).save(buffer, "JPEG", quality=80, exif=exif.tobytes())
    return buffer.getvalue()


def _fuzz_seed_png() -> bytes:
    """A small palette PNG with transparency and a text chunk."""
    image = Image.open(io.BytesIO(jpeg_bytes(24, 16))).convert("P")
    image.info["transparency"] = 0
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "fuzz")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


SEED_JPEG, SEED_PNG = _fuzz_seed_jpeg(), _fuzz_seed_png()


@st.composite
def mutations_of(draw, original: bytes) -> bytes:
    """`original` with 1-6 edits: flip a byte, insert or delete a run, or cut the end off.

    Half the edits land in the first 200 bytes, where the headers are.
    """
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        limit = min(len(data), 200) if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, limit - 1))
        edit = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if edit == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


FUZZ_SETTINGS = settings(
    max_examples=150, deadline=5000, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def assert_image_or_invalid(data: bytes, **options) -> None:
    try:
        image = load_image(data, **options)
    except InvalidImageError as exc:
        assert_user_sentence(str(exc))
        event(f"refused: {str(exc)[:40]}")  # shown by --hypothesis-show-statistics
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        event("decoded")


@FUZZ_SETTINGS
@given(mutations_of(SEED_JPEG))
def test_fuzz_jpeg(data):
    # A tiny target size so that draft (reduced-scale decoding) runs on this 48x32 seed.
    assert_image_or_invalid(data, target_size=(4, 4))


@FUZZ_SETTINGS
@given(mutations_of(SEED_PNG))
def test_fuzz_png(data):
    assert_image_or_invalid(data)


@settings(FUZZ_SETTINGS, max_examples=30)
@given(st.one_of(mutations_of(SEED_JPEG), mutations_of(SEED_PNG)))
def test_fuzz_caption(tiny_captioner, data):
    assert caption_outcome(tiny_captioner, data) in (CAPTION, ERROR)
