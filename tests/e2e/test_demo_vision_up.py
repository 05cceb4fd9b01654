"""The README's image example: `triphase up --model demo-vision --encode 1` answers a chat with an
image through the encode pool (the offline demo: MobileNetV2 + a fixed projector + SmolLM2)."""

from __future__ import annotations

import base64
import io
import urllib.request

import openai
import pytest
from PIL import Image, ImageDraw

from triphase.local.processes import triphase_up

pytestmark = pytest.mark.slow


def drawing() -> str:
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 90, 200))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_the_demo_answers_an_image_through_the_encode_pool():
    with triphase_up(["--model", "demo-vision", "--encode", "1"], timeout=300) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["demo-vision"]
        content = [{"type": "text", "text": "What is in this picture?"},
                   {"type": "image_url", "image_url": {"url": drawing()}}]
        answer = client.chat.completions.create(model="demo-vision", max_tokens=4,
                                                messages=[{"role": "user", "content": content}])
        assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
        assert answer.usage.prompt_tokens > 49  # the image's 49 positions and the text
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        assert 'triphase_images_total{model="demo-vision",where="encode_pool"} 1.0' in metrics
