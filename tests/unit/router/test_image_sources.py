"""Where a chat's images may come from, and the bounds on each source: data: URLs, files under the
image directory only, http(s) only when enabled (a real local HTTP server: sizes, redirects, time)."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from aiohttp import web
from PIL import Image

from triphase.common.images import ImageLimits, digest
from triphase.router.errors import BadRequest
from triphase.router.openai.images import ImageSources, load


def png(size=(16, 16)):
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


LIMITS = ImageLimits(max_bytes=4096, max_pixels=64 * 64, max_images=4)
PNG = png()


def run(url, sources):
    return asyncio.run(load(url, sources, "messages.0.content.1.image_url"))


def test_data_urls():
    assert run("data:image/png;base64," + base64.b64encode(PNG).decode(), ImageSources(LIMITS)).digest == digest(PNG)
    with pytest.raises(BadRequest, match="larger than 4096 bytes") as error:
        run("data:image/png;base64," + "A" * 8000, ImageSources(LIMITS))
    assert error.value.param == "messages.0.content.1.image_url"
    with pytest.raises(BadRequest, match="pixels"):
        run("data:image/png;base64," + base64.b64encode(png((65, 65))).decode(), ImageSources(LIMITS))


def test_files_only_under_the_image_directory(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    sources = ImageSources(LIMITS, image_dir=root)
    assert run("a.png", sources).data == PNG
    assert run(f"file://{root}/a.png", sources).data == PNG
    for url in ("../secret.png", "escape.png", str(tmp_path / "secret.png"), "missing.png"):
        with pytest.raises(BadRequest):
            run(url, sources)
    with pytest.raises(BadRequest, match="not read by this server"):
        run("a.png", ImageSources(LIMITS))


@pytest.fixture
def server(unused_tcp_port):
    async def image(request):
        return web.Response(body=PNG, content_type="image/png")

    async def big(request):
        response = web.StreamResponse()  # no Content-Length: the bound applies while reading
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"\0" * 1024)
        return response

    async def slow(request):
        await asyncio.sleep(2)
        return web.Response(body=PNG)

    async def moved(request):
        raise web.HTTPFound("/image")

    app = web.Application()
    app.router.add_get("/image", image)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    app.router.add_get("/moved", moved)
    return app, f"http://127.0.0.1:{unused_tcp_port}", unused_tcp_port


def test_fetching_is_off_unless_enabled_and_bounded(server):
    app, base, port = server
    sources = ImageSources(LIMITS, fetch=True, fetch_timeout_s=1.0)

    async def scenario():
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            results = {}
            for path, src in (("image", sources), ("image-off", ImageSources(LIMITS)), ("big", sources),
                              ("slow", sources), ("moved", sources)):
                url = f"{base}/{path.split('-')[0]}"
                try:
                    results[path] = (await load(url, src, "p")).data
                except BadRequest as exc:
                    results[path] = exc.message
            return results
        finally:
            await runner.cleanup()

    results = asyncio.run(scenario())
    assert results["image"] == PNG
    assert "not fetched" in results["image-off"]
    assert "larger than 4096 bytes" in results["big"]
    assert "longer than 1 s" in results["slow"]
    assert "HTTP 302" in results["moved"]  # redirects are not followed (they could lead anywhere)
