"""`triphase up --encode 1` on a tiny LLaVA, through the official openai client: image requests flow
encode -> prefill -> decode and answer what one process answers; a repeated image is not encoded
twice; bad images are a 400 that affects no other request; a killed encode worker costs no request."""

from __future__ import annotations

import base64
import re
import signal
import urllib.request

import grpc
import openai
import psutil
import pytest

from tests.checkpoints import build_llava, png
from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.common.models.files import load_tokenizer
from triphase.common.models.tokenizer import ImageSlot
from triphase.common.process.net import free_port
from triphase.common.security import mtls
from triphase.control.balancer import Slo
from triphase.control.planner import Planner
from triphase.control.signals import MetricsUnavailable, PrometheusSignals, http_query
from triphase.local.processes import triphase_up, up_bundle, wait_for
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    build_llava("clip", folder)
    return folder


@pytest.fixture(scope="module")
def stack(model):
    prometheus_port = free_port()
    with triphase_up(["--model", str(model), "--dtype", "float32", "--kv-cache-mib", "16", "--encode", "1",
                      "--prefill", "1", "--decode", "1", "--prometheus", "--prometheus-port", str(prometheus_port)],
                     timeout=300) as (proc, url):
        said = "".join(line for _, line in proc.said)
        encoder = re.search(r"encode-0 ready on (127\.0\.0\.1:\d+)", said).group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, url, encoder, client.models.list().data[0].id, f"http://127.0.0.1:{prometheus_port}", \
            up_bundle(proc, "router")  # Encode is the router's method


def data_url(data, kind="png"):
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def ask(stack, parts):
    client, _, _, name, _, _ = stack
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": p}
               for p in parts]
    return client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}],
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})


def expected_text(model, parts):
    """What one in-process engine answers for the same chat."""
    tokenizer = load_tokenizer(str(model))[0]
    engine = Engine(load_model(str(model)), EngineConfig(num_kv_blocks=64))
    images = [p for p in parts if isinstance(p, bytes)]
    slot = ImageSlot(engine.image_token_id, engine.vision_config.tokens_per_image)
    ids, offsets = tokenizer.encode_chat_with_images(
        [{"role": "user", "content": [slot if isinstance(p, bytes) else p for p in parts]}])
    embeds = engine.encode_images([decode(data, ImageLimits()) for data in images])
    inputs = [ImageInput(ImageSpan(at, slot.count, digest(data)), rows)
              for at, data, rows in zip(offsets, images, embeds, strict=True)]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return engine.generate([ids], params, images=[inputs])[0].text


def metric(url, name, labels):
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_image_requests_answer_as_one_process(stack, model):
    a, b = png(11, 64, 48), png(12, 40, 90)
    parts = ["w10 w11", a, "w12", b, "w13 w14"]
    answer = ask(stack, [{"url": data_url(p)} if isinstance(p, bytes) else p for p in parts])
    assert answer.choices[0].message.content == expected_text(model, parts)
    assert answer.usage.prompt_tokens == 2 + 5 + 2 * 16 + 1  # w3 .. w4, five words, 2 images x 16, w5
    assert metric(stack[1], "triphase_images_total", {"where": "encode_pool"}) >= 2


def test_a_repeated_image_is_not_encoded_again(stack):
    image = png(13, 50, 50)
    first = ask(stack, ["w20", {"url": data_url(image)}])
    again = ask(stack, ["w20", {"url": data_url(image)}])
    assert again.choices[0].message.content == first.choices[0].message.content
    with mtls.sync_channel(stack[2], stack[5]) as channel:  # the encode worker has it cached
        reply = worker_pb2_grpc.WorkerServiceStub(channel).Encode(pb.EncodeRequest(data=image), timeout=30)
    assert reply.cached and reply.digest == digest(image)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16  # and the prefill worker's prefix cache


@pytest.mark.parametrize(("url", "message"), [
    (data_url(png(14, 30, 30)[:60]), "decoded"),  # truncated: the header reads, the pixels do not
    (data_url(b"GIF89a" + bytes(40), "gif"), "data:image/png|jpeg|webp"),
    (data_url(b"not an image at all"), "PNG, JPEG or WebP"),
    ("data:image/png;base64,%%%not base64", "base64"),
    ("http://169.254.169.254/latest/meta-data", "not fetched"),
    ("/etc/passwd", "not read"),
])
def test_bad_images_are_400s_and_nothing_else_suffers(stack, url, message):
    with pytest.raises(openai.BadRequestError) as error:
        ask(stack, ["w30", {"url": url}])
    assert message in str(error.value)
    assert ask(stack, ["w31", {"url": data_url(png(15, 20, 20))}]).choices[0].finish_reason == "length"


def test_too_many_or_too_large_images(stack):
    small = {"url": data_url(png(16, 8, 8))}
    with pytest.raises(openai.BadRequestError, match="at most 4 per request"):
        ask(stack, ["w32", *[small] * 5])
    huge = {"url": data_url(png(17, 1, 1) + bytes(ImageLimits().max_bytes))}
    with pytest.raises(openai.BadRequestError, match="larger than"):
        ask(stack, ["w33", huge])


def test_a_killed_encode_worker_costs_no_request(stack, model):
    _, url, encoder, _, _, bundle = stack
    on_prefill = metric(url, "triphase_images_total", {"where": "prefill_worker"})
    port = int(encoder.rsplit(":", 1)[1])
    pid = next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
               and c.status == psutil.CONN_LISTEN)
    psutil.Process(pid).send_signal(signal.SIGKILL)
    parts = ["w40", png(18, 33, 33)]
    answer = ask(stack, [{"url": data_url(p)} if isinstance(p, bytes) else p for p in parts])
    assert answer.choices[0].message.content == expected_text(model, parts)
    assert metric(url, "triphase_images_total", {"where": "prefill_worker"}) == on_prefill + 1  # encoded there
    wait_for(lambda: _encodes(encoder, bundle), 120, "the encode worker to be restarted on its port")


def test_the_planner_reads_what_the_encode_pool_needs_from_prometheus(stack):
    """The encode pool's signals, by the planner's PromQL on the real Prometheus scraping this stack:
    images arriving, seconds an encode worker spends on one, and its queue."""
    reader = PrometheusSignals(http_query(stack[4]), "", Slo(2.0, 0.5), 90, 60)
    seeds = iter(range(100, 1000))

    def measured():  # a fresh image each time: the counters must rise while Prometheus scrapes them
        ask(stack, ["w50", {"url": data_url(png(next(seeds), 40, 40))}])
        try:
            signals = reader.read()
        except MetricsUnavailable:  # not scraped yet
            return None
        # queued_images: a scrape may fall inside an encode; one after it sees the queue empty (a leak never)
        return signals if signals.image_rate and signals.encode_s and signals.queued_images == 0 else None

    signals = wait_for(measured, 90, "Prometheus to have scraped the images, their encode time and an empty queue")
    assert 0 < signals.encode_s < 30
    demand = Planner(Slo(2.0, 0.5)).encode_demand(signals)
    assert demand == pytest.approx(signals.image_rate * signals.encode_s)


def _encodes(endpoint, bundle):
    try:
        with mtls.sync_channel(endpoint, bundle) as channel:
            return worker_pb2_grpc.WorkerServiceStub(channel).Encode(pb.EncodeRequest(data=png(19, 9, 9)),
                                                                      timeout=5).tokens == 16
    except grpc.RpcError:
        return False
