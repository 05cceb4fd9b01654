"""Client images are checked from their header before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from triphase.common.block_hash import ImageSpan, prompt_block_hashes
from triphase.common.images import ImageError, ImageLimits, decode, digest, inspect

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1000 * 1000)


def encoded(fmt, size=(20, 10), mode="RGB", color=(10, 200, 30)):
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt)
    return out.getvalue()


def png_bomb(width, height):
    """A valid PNG header claiming width x height with a tiny, highly compressed body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (width + 1) * 64, 9)  # far fewer rows than claimed: never decoded
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_are_inspected_and_decoded(fmt):
    data = encoded(fmt)
    info = inspect(data, LIMITS)
    assert (info.format, info.width, info.height, info.digest) == (fmt, 20, 10, digest(data))
    image = decode(data, LIMITS)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_transparency_is_composited_on_white():
    image = decode(encoded("PNG", mode="RGBA", color=(0, 0, 0, 0)), LIMITS)
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("data", "message"), [
    (encoded("GIF"), "PNG, JPEG or WebP"),
    (b"not an image at all", "PNG, JPEG or WebP"),
    (b"", "PNG, JPEG or WebP"),
    (png_bomb(50_000, 50_000), "pixels"),
    (png_bomb(1001, 1000), "pixels"),
    (b"\0" * (LIMITS.max_bytes + 1), "bytes"),
])
def test_refused_before_decoding(data, message):
    with pytest.raises(ImageError, match=message):
        inspect(data, LIMITS)
    with pytest.raises(ImageError, match=message):
        decode(data, LIMITS)


def test_truncated_image_fails_cleanly():
    data = encoded("PNG", size=(300, 300))
    with pytest.raises(ImageError, match="could not be decoded"):
        decode(data[: len(data) // 2], LIMITS)


def test_block_hashes_tell_images_apart():
    tokens = [5] * 4 + [9] * 24 + [6] * 4  # an image run at 4..28 in 32 tokens, blocks of 8
    a = prompt_block_hashes(tokens, 8, [ImageSpan(4, 24, b"a" * 32)])
    b = prompt_block_hashes(tokens, 8, [ImageSpan(4, 24, b"b" * 32)])
    plain = prompt_block_hashes(tokens, 8)
    assert len(a) == len(b) == 4
    assert all(x != y for x, y in zip(a, b, strict=True))  # every block overlaps the image or follows it
    assert a[0] != plain[0] and a == prompt_block_hashes(tokens, 8, [ImageSpan(4, 24, b"a" * 32)])
    text_first = [5] * 8 + [9] * 16
    assert prompt_block_hashes(text_first, 8, [ImageSpan(8, 16, b"a" * 32)])[0] == \
        prompt_block_hashes(text_first, 8, [ImageSpan(8, 16, b"b" * 32)])[0]  # the text block is shared
