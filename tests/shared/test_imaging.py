import io
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared.imaging import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedFormatError,
    decode_image,
    decode_mask,
    encode_png,
    read_image,
    read_mask,
)
from tests.data.make_hostile import png

HOSTILE = Path(__file__).resolve().parents[1] / "data" / "hostile"

# 2x3 RGB with distinct values everywhere, so any channel or axis mix-up shows.
RGB = np.array(
    [[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [40, 50, 60], [70, 80, 90]]],
    dtype=np.uint8,
)


def encoded(array_or_image, fmt: str, **params) -> bytes:
    im = array_or_image
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# -- the hostile files ---------------------------------------------------------------------------


def test_hostile_files_are_committed_and_small():
    names = sorted(p.name for p in HOSTILE.iterdir() if p.suffix != ".md")
    assert names == [
        "bomb.png",
        "cmyk.jpg",
        "empty.png",
        "gray16.png",
        "rgba.png",
        "text.png",
        "truncated.png",
    ]
    assert (HOSTILE / "bomb.png").stat().st_size < 1_000_000


@pytest.mark.parametrize(
    ("name", "error", "status", "code"),
    [
        ("truncated.png", CorruptImageError, 400, "corrupt_image"),
        ("empty.png", EmptyImageError, 400, "empty_image"),
        ("text.png", CorruptImageError, 400, "corrupt_image"),
        ("bomb.png", ImageTooLargeError, 413, "image_too_large"),
    ],
)
def test_hostile_files_raise_typed_errors(name, error, status, code):
    data = (HOSTILE / name).read_bytes()
    with pytest.raises(error) as info:
        decode_image(data)
    assert info.value.status == status
    assert info.value.code == code
    with pytest.raises(error):
        decode_mask(data)


def test_bomb_header_really_claims_30000_squared():
    data = (HOSTILE / "bomb.png").read_bytes()
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)


def test_bomb_is_refused_before_any_pixel_buffer(monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixel data was about to be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(Image.core, "new", no_decoding)
    data = (HOSTILE / "bomb.png").read_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "30000x30000" in str(info.value)
    assert peak < 1_000_000  # the decoded image would be 2.7 GB


def test_own_cap_is_checked_from_the_header(monkeypatch):
    data = encoded(np.zeros((100, 100, 3), np.uint8), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, max_pixels=9_999)
    assert "100x100" in str(info.value)
    assert "9,999" in str(info.value)


def test_default_cap_refuses_an_image_pillow_alone_would_decode(monkeypatch):
    # 8001x8000 is over the 64 MP default cap but under Pillow's own bomb limit (89.5 MP), so
    # only this module's header check stands between the upload and a 192 MB RGB decode.
    side = (8001, 8000)
    assert DEFAULT_MAX_PIXELS < side[0] * side[1] < Image.MAX_IMAGE_PIXELS
    data = encoded(np.zeros(side[::-1], np.uint8), "PNG", compress_level=9)  # 62 kB
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))

    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data)

    assert "8001x8000" in str(info.value) and "64,000,000" in str(info.value)


def test_cap_is_inclusive():
    data = encoded(np.zeros((100, 100, 3), np.uint8), "PNG")
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_gray16_is_scaled_over_the_full_range_not_clipped():
    out = decode_image((HOSTILE / "gray16.png").read_bytes())
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 1, 128, 255], [255, 128, 1, 0]]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_gray16_mask_keeps_its_values():
    out = decode_mask((HOSTILE / "gray16.png").read_bytes())
    assert out.dtype == np.uint16
    assert out.tolist() == [[0, 257, 32896, 65535], [65535, 32896, 257, 0]]


def test_rgba_drops_alpha():
    out = decode_image((HOSTILE / "rgba.png").read_bytes())
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]]
    assert decode_mask((HOSTILE / "rgba.png").read_bytes()).tolist() == out.tolist()


def test_cmyk_jpeg_becomes_rgb():
    out = decode_image((HOSTILE / "cmyk.jpg").read_bytes())
    assert out.shape == (8, 32, 3) and out.dtype == np.uint8
    # Block centres: white, cyan, black, red (JPEG is lossy: allow a few levels).
    expected = np.array([[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 0, 0]])
    got = out[4, 4::8].astype(int)
    assert np.abs(got - expected).max() <= 8


# -- formats and modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP", "WEBP"])
def test_lossless_allowed_formats_decode_exactly(fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encoded(RGB, fmt, **params))
    assert out.dtype == np.uint8
    assert out.tolist() == RGB.tolist()
    assert out.flags.writeable and out.flags.c_contiguous


def test_jpeg_decodes():
    image = np.full((16, 16, 3), (200, 100, 50), dtype=np.uint8)
    out = decode_image(encoded(image, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - image).max() <= 4


def test_allowed_formats_are_the_documented_five():
    assert frozenset({"PNG", "JPEG", "TIFF", "WEBP", "BMP"}) == ALLOWED_FORMATS


@pytest.mark.parametrize("fmt", ["GIF", "ICO", "PPM"])
def test_other_formats_are_unsupported(fmt):
    data = encoded(np.zeros((4, 4, 3), np.uint8), fmt)
    with pytest.raises(UnsupportedFormatError) as info:
        decode_image(data)
    assert info.value.status == 415
    assert info.value.code == "unsupported_format"
    assert fmt in str(info.value) and "PNG" in str(info.value)


def test_float_tiff_is_unsupported():
    data = encoded(Image.fromarray(np.ones((2, 2), np.float32)), "TIFF")
    with pytest.raises(UnsupportedFormatError, match="'F'"):
        decode_image(data)


@pytest.mark.parametrize(
    ("mode", "value", "rgb"),
    [
        ("L", 7, [7, 7, 7]),
        ("LA", (7, 0), [7, 7, 7]),
        ("1", 1, [255, 255, 255]),
    ],
)
def test_single_channel_modes_become_rgb(mode, value, rgb):
    data = encoded(Image.new(mode, (3, 2), value), "PNG")
    out = decode_image(data)
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == rgb


def test_palette_image_becomes_its_colours_and_mask_keeps_indices():
    data = encode_png(np.array([[0, 1], [2, 0]], np.uint8), palette=[9, 8, 7, 1, 2, 3, 4, 5, 6])
    assert decode_image(data).tolist() == [[[9, 8, 7], [1, 2, 3]], [[4, 5, 6], [9, 8, 7]]]
    mask = decode_mask(data)
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[0, 1], [2, 0]]


def test_sixteen_bit_rgb_png_becomes_8_bit():
    raw = b"\x00" + bytes.fromhex("ffff 8000 0101 00ff 0100 0000".replace(" ", ""))
    out = decode_image(png(2, 1, 16, 2, raw))
    assert out.tolist() == [[[255, 128, 1], [0, 1, 0]]]


def test_one_bit_mask_is_zero_one():
    data = encoded(Image.fromarray(np.array([[True, False]])), "PNG")
    out = decode_mask(data)
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0]]


# -- never a bare PIL exception -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n",  # signature only
        png(4, 4, 8, 2, b"")[:33],  # header, no data
        b"\xff\xd8\xff\xe0" + b"\x00" * 20,  # JPEG start, nonsense after
        b"II*\x00" + b"\x08\x00\x00\x00" + b"\x00" * 20,  # TIFF start, empty IFD
        b"BM" + b"\x00" * 60,  # BMP start, nonsense after
        bytes(range(256)),
    ],
)
def test_broken_headers_are_corrupt(data):
    with pytest.raises(CorruptImageError):
        decode_image(data)


# PIL warns about some broken TIFF tags before failing; the warning is not what is tested here.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_give_rgb_or_a_typed_error():
    rng = random.Random(0)
    originals = [encoded(RGB, fmt) for fmt in ("PNG", "JPEG", "TIFF", "BMP", "WEBP")]
    decoded = failed = 0
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[: rng.randrange(1, len(data))]
            try:
                out = decode_image(bytes(data), max_pixels=1_000_000)
            except ImageError:
                failed += 1
            else:
                assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
                decoded += 1
    assert decoded + failed == 200
    assert failed > 0


@pytest.mark.filterwarnings("error")
def test_warnings_turned_into_errors_still_become_typed_errors():
    data = b"II*\x00" + b"\xff" * 20  # a TIFF whose IFD points past the end
    with pytest.raises(UserWarning):  # what PIL alone does when warnings are errors
        Image.open(io.BytesIO(data), formats=["TIFF"])
    with pytest.raises(CorruptImageError):
        decode_image(data)


def test_empty_and_wrong_types():
    with pytest.raises(EmptyImageError):
        decode_image(b"")
    with pytest.raises(EmptyImageError):
        decode_mask(bytearray())
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


# -- files -----------------------------------------------------------------------------------------


def test_read_errors_name_the_path_and_keep_their_type():
    path = HOSTILE / "bomb.png"
    with pytest.raises(ImageTooLargeError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.status == 413 and info.value.code == "image_too_large"
    with pytest.raises(CorruptImageError, match="truncated.png"):
        read_mask(HOSTILE / "truncated.png")


def test_read_image_and_mask(tmp_path):
    (tmp_path / "x.png").write_bytes(encoded(RGB, "PNG"))
    assert read_image(tmp_path / "x.png").tolist() == RGB.tolist()
    (tmp_path / "m.png").write_bytes(encode_png(np.array([[0, 2]], np.uint8)))
    assert read_mask(str(tmp_path / "m.png")).tolist() == [[0, 2]]


def test_read_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "nope.png")


# -- encode_png ------------------------------------------------------------------------------------


def test_encode_png_modes():
    index = np.array([[0, 1], [2, 255]], np.uint8)
    with Image.open(io.BytesIO(encode_png(index))) as im:
        assert im.mode == "L"
        assert np.asarray(im).tolist() == index.tolist()
    with Image.open(io.BytesIO(encode_png(index, palette=[1, 2, 3]))) as im:
        assert im.mode == "P"
        assert np.asarray(im).tolist() == index.tolist()
        assert im.getpalette()[:6] == [1, 2, 3, 0, 0, 0]
    with Image.open(io.BytesIO(encode_png(RGB))) as im:
        assert im.mode == "RGB"
        assert np.asarray(im).tolist() == RGB.tolist()


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 2), np.int32), np.zeros((2, 2, 4), np.uint8), np.zeros(3, np.uint8)],
)
def test_encode_png_rejects_other_arrays(array):
    with pytest.raises(ValueError):
        encode_png(array)
