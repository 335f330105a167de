"""Write the hostile image files in ``tests/data/hostile/``.

Deterministic: the PNGs are assembled chunk by chunk with zlib, the JPEG by Pillow from fixed
pixels, so running it twice gives the same files. Run from the repository root:

    .venv/bin/python tests/data/make_hostile.py
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

HOSTILE_DIR = Path(__file__).resolve().parent / "hostile"

# 16-bit grey values chosen so their 8-bit versions are easy to check: v / 257 exactly.
GRAY16_VALUES = [[0, 257, 32896, 65535], [65535, 32896, 257, 0]]
# (r, g, b, a): the colour must survive, the alpha must be dropped.
RGBA_PIXELS = [[(255, 0, 0, 255), (0, 255, 0, 128)], [(0, 0, 255, 0), (10, 20, 30, 64)]]
# (c, m, y, k) 8x8 blocks; a JPEG is lossy, so whole blocks of one colour keep it nearly exact.
CMYK_BLOCKS = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 255, 255, 0)]
BOMB_SIZE = 30_000


def png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG from already-filtered scanlines (each row starts with its filter byte)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def rgb_png(width: int, height: int) -> bytes:
    """A small deterministic RGB gradient."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += bytes([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256])
        rows.append(bytes(row))
    return png(width, height, 8, 2, b"".join(rows))


def gray16_png() -> bytes:
    raw = b"".join(b"\x00" + struct.pack(">4H", *row) for row in GRAY16_VALUES)
    return png(4, 2, 16, 0, raw)


def rgba_png() -> bytes:
    raw = b"".join(b"\x00" + b"".join(bytes(px) for px in row) for row in RGBA_PIXELS)
    return png(2, 2, 8, 6, raw)


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000x30000 RGB (2.7 GB decoded) with a tiny IDAT: a few
    rows of zeros. Decoding would allocate the full buffer before noticing the missing rows."""
    row = b"\x00" + bytes(3 * BOMB_SIZE)
    return png(BOMB_SIZE, BOMB_SIZE, 8, 2, row * 4)


def cmyk_jpeg() -> bytes:
    im = Image.new("CMYK", (8 * len(CMYK_BLOCKS), 8))
    for i, colour in enumerate(CMYK_BLOCKS):
        im.paste(colour, (8 * i, 0, 8 * i + 8, 8))
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def build() -> dict[str, bytes]:
    whole = rgb_png(64, 64)
    return {
        "truncated.png": whole[: len(whole) // 2],
        "empty.png": b"",
        "text.png": b"This is a text file, not an image.\n",
        "bomb.png": bomb_png(),
        "gray16.png": gray16_png(),
        "rgba.png": rgba_png(),
        "cmyk.jpg": cmyk_jpeg(),
    }


def main() -> None:
    HOSTILE_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (HOSTILE_DIR / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
