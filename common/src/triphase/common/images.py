"""Images a client sends, checked before any pixel is decoded.

`inspect` reads only the header (format, width, height) and enforces `ImageLimits`; `decode` then
decodes an inspected image to RGB. A decompression bomb (a small PNG that inflates to gigapixels)
fails `inspect`: the pixel count is bounded before the decoder allocates anything. The router
inspects (a clear 400 before work is queued); the worker that encodes inspects again and decodes.
`digest` is the content hash that keys the embedding cache and the prefix cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import warnings

from PIL import Image

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageError(ValueError):
    """An image a client sent cannot be used (the message is safe to return to it)."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 5 * 2**20  # encoded size
    max_pixels: int = 4096 * 4096  # width * height after decoding
    max_images: int = 4  # per request

    @property
    def max_base64_chars(self) -> int:
        """The longest base64 text of an image within max_bytes (checked before decoding it)."""
        return 4 * -(-self.max_bytes // 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The image limits as flags (`triphase worker` and `triphase router` share them)."""
    defaults = ImageLimits()
    parser.add_argument("--image-max-bytes", type=int, default=defaults.max_bytes, help="per encoded image")
    parser.add_argument("--image-max-pixels", type=int, default=defaults.max_pixels, help="width x height per image")
    parser.add_argument("--image-max-count", type=int, default=defaults.max_images, help="images per request")


def limits_from_args(args: argparse.Namespace) -> ImageLimits:
    limits = ImageLimits(args.image_max_bytes, args.image_max_pixels, args.image_max_count)
    if min(limits.max_bytes, limits.max_pixels, limits.max_images) < 1:
        raise ValueError("--image-max-bytes, --image-max-pixels and --image-max-count must be positive")
    return limits


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    format: str  # a key of FORMATS
    width: int
    height: int
    digest: bytes  # sha256 of the encoded bytes


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def inspect(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Format and size from the header; ImageError if it is not a PNG, JPEG or WebP within `limits`."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with _open(data) as image:
            fmt, (width, height) = str(image.format), image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has more pixels than PIL opens; the limit is {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable PNG, JPEG or WebP image ({exc.__class__.__name__})") from None
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    return ImageInfo(fmt, width, height, digest(data))


def decode(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image as RGB pixels (alpha composited on white, as a viewer shows it); ImageError for
    anything `inspect` refuses or a file that is truncated or corrupt past its header."""
    inspect(data, limits)
    try:
        with _open(data) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the image could not be decoded ({exc.__class__.__name__})") from None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=list(FORMATS))
