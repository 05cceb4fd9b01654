"""The images of a chat request: fetched from where the client points, checked, and digested.

Sources, each bounded before its bytes are read in full:
- `data:image/png|jpeg|webp;base64,...`: the base64 text is length-checked, then decoded;
- a local file (`file://...` or a path), only under `--image-dir` (resolved, so `..` and symlinks
  cannot leave it);
- `http(s)://...`, only with `--image-fetch` (off by default: a server that fetches what clients name
  can be pointed at internal addresses), read in chunks up to the byte limit within a deadline.
Then `inspect` reads the header (PNG, JPEG or WebP within the pixel limit) and computes the digest;
no pixel is decoded here. Every failure is a 400 naming the image's place in the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import pathlib
import re
import urllib.parse

import aiohttp

from triphase.common.images import ImageError, ImageLimits, inspect
from triphase.router.errors import BadRequest

_DATA_URL = re.compile(r"data:(image/(?:png|jpeg|jpg|webp));base64,", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ImageSources:
    limits: ImageLimits
    image_dir: pathlib.Path | None = None  # local files are readable only under this directory
    fetch: bool = False  # http(s) URLs are fetched
    fetch_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    data: bytes
    digest: bytes


async def load(url: str, sources: ImageSources, param: str, session: aiohttp.ClientSession | None = None,
               ) -> LoadedImage:
    """The image `url` names, checked; BadRequest (with `param`) for anything unusable."""
    limits = sources.limits
    try:
        if url[:5].lower() == "data:":
            data = _from_data_url(url, limits)
        elif url[:8].lower().startswith(("http://", "https://")):
            if not sources.fetch:
                raise ImageError("image URLs are not fetched by this server; send the image as a data: URL")
            data = await _fetch(url, sources, session)
        else:
            data = _from_file(url, sources)
        info = await asyncio.to_thread(inspect, data, limits) if len(data) > 1 << 20 else inspect(data, limits)
    except ImageError as exc:
        raise BadRequest(f"{param}: {exc}", param=param, code="invalid_image") from None
    return LoadedImage(data, info.digest)


def _from_data_url(url: str, limits: ImageLimits) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError("a data: URL must be data:image/png|jpeg|webp;base64,...")
    text = url[match.end():]
    if len(text) > limits.max_base64_chars + 4:
        raise ImageError(f"image is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data: URL is not valid base64") from None


def _from_file(url: str, sources: ImageSources) -> bytes:
    if sources.image_dir is None:
        raise ImageError("local image files are not read by this server; send the image as a data: URL")
    parsed = urllib.parse.urlparse(url)
    raw = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url
    if parsed.scheme not in ("", "file") or not raw:
        raise ImageError("an image URL must be data:, a file under the image directory, or http(s)")
    root = sources.image_dir.resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise ImageError("the image file is outside the image directory")
    try:
        if path.stat().st_size > sources.limits.max_bytes:
            raise ImageError(f"image is larger than {sources.limits.max_bytes} bytes")
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise ImageError("no readable image file at that path under the image directory") from None


async def _fetch(url: str, sources: ImageSources, session: aiohttp.ClientSession | None) -> bytes:
    limit = sources.limits.max_bytes
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with asyncio.timeout(sources.fetch_timeout_s), \
                session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ImageError(f"fetching the image answered HTTP {response.status}")
            if (response.content_length or 0) > limit:
                raise ImageError(f"image is larger than {limit} bytes")
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 << 10):
                data += chunk
                if len(data) > limit:
                    raise ImageError(f"image is larger than {limit} bytes")
            return bytes(data)
    except TimeoutError:
        raise ImageError(f"fetching the image took longer than {sources.fetch_timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise ImageError(f"the image could not be fetched ({exc.__class__.__name__})") from None
    finally:
        if own:
            await session.close()
