"""Encode, prefill and decode workers as real processes on a tiny LLaVA checkpoint: an image encoded on
the encode worker, its embeddings read by the prefill worker, the KV handed to the decode worker, gives
the tokens the in-process engine gives; a worker that encodes locally gives them too."""

from __future__ import annotations

import contextlib
import urllib.request

import grpc
import pytest

from tests.checkpoints import IMAGE_TOKEN, build_llava, png
from triphase.api.v1 import worker_pb2 as pb
from triphase.api.v1 import worker_pb2_grpc
from triphase.common.block_hash import ImageSpan
from triphase.common.images import ImageLimits, decode, digest
from triphase.local.processes import triphase_process
from triphase.workers.engine.core import Engine, EngineConfig
from triphase.workers.engine.multimodal import ImageInput
from triphase.workers.engine.sampling import SamplingParams
from triphase.workers.models.loader import load_model

pytestmark = pytest.mark.slow
TOKENS = 16  # per image
TEXT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
GREEDY = pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encode")
    model = tmp / "llava"
    model.mkdir()
    build_llava("clip", model)
    common = ["worker", "--model", str(model), "--dtype", "float32", "--kv-cache-mib", "16", "--port", "0",
              "--metrics-port", "0"]
    with contextlib.ExitStack() as stack:
        endpoints = {}
        for role in ("encode", "prefill", "decode", "both"):
            _, port = stack.enter_context(triphase_process(tmp, role, [*common, "--role", role]))
            endpoints[role] = f"127.0.0.1:{port}"
            endpoints[f"{role}-metrics"] = f"127.0.0.1:{(tmp / f'{role}.port.metrics').read_text()}"
        channels = {role: stack.enter_context(grpc.insecure_channel(endpoints[role]))
                    for role in ("encode", "prefill", "decode", "both")}
        yield model, endpoints, {role: worker_pb2_grpc.WorkerServiceStub(ch) for role, ch in channels.items()}


def embedding_bytes(metrics_endpoint, backend):
    text = urllib.request.urlopen(f"http://{metrics_endpoint}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("triphase_embedding_bytes_total{") and 'direction="received"' in line \
                and f'backend="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def prompt(images, where):
    tokens, spans, cursor = [], [], 0
    for data, at in zip(images, where, strict=True):
        tokens += TEXT[cursor:at]
        spans.append((len(tokens), data))
        tokens += [IMAGE_TOKEN] * TOKENS
        cursor = at
    return tokens + TEXT[cursor:], spans


def reference_tokens(model, tokens, spans):
    engine = Engine(load_model(str(model)), EngineConfig(num_kv_blocks=64, block_size=16))
    embeds = engine.encode_images([decode(data, ImageLimits()) for _, data in spans])
    inputs = [ImageInput(ImageSpan(at, TOKENS, digest(data)), rows) for (at, data), rows in zip(spans, embeds,
                                                                                              strict=True)]
    return engine.generate([tokens], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                           images=[inputs])[0].token_ids


def test_encode_prefill_decode_matches_one_process(stack):
    model, endpoints, stubs = stack
    images = [png(1, 60, 45), png(2, 33, 70)]
    tokens, spans = prompt(images, where=[2, 7])
    first = [stubs["encode"].Encode(pb.EncodeRequest(data=data), timeout=60) for data in images]
    assert [r.digest for r in first] == [digest(d) for d in images]
    assert all(r.tokens == TOKENS and not r.cached and r.encode_seconds > 0 for r in first)
    assert stubs["encode"].Encode(pb.EncodeRequest(data=images[0]), timeout=60).cached  # a repeat is a hit

    refs = [pb.PromptImage(offset=at, length=TOKENS, digest=digest(data), source_endpoint=endpoints["encode"],
                           slot=reply.slot) for (at, data), reply in zip(spans, first, strict=True)]
    prefilled = stubs["prefill"].Prefill(pb.PrefillRequest(request_id="mm-1", prompt_token_ids=tokens,
                                                           sampling=GREEDY, images=refs), timeout=60)
    # The prefill worker READ both images' embeddings out of the encode worker's cache with NIXL.
    assert all(r.HasField("slot") for r in first)
    assert embedding_bytes(endpoints["prefill-metrics"], "nixl") >= 2 * TOKENS * 64 * 4
    assert embedding_bytes(endpoints["prefill-metrics"], "grpc") == 0
    only_spans = [pb.PromptImage(offset=r.offset, length=r.length, digest=r.digest) for r in refs]
    decoded = list(stubs["decode"].Decode(pb.DecodeRequest(request_id="mm-1", prompt_token_ids=tokens,
                                                           sampling=GREEDY, kv=prefilled.kv, images=only_spans),
                                          timeout=60))
    disaggregated = [t for d in decoded for t in d.token_ids]
    assert disaggregated[0] == prefilled.first.token_ids[0]  # the decode worker repeats the first token

    local = [pb.PromptImage(offset=at, length=TOKENS, digest=digest(data), data=data) for at, data in spans]
    together = [t for d in stubs["both"].Generate(pb.GenerateRequest(request_id="mm-2", prompt_token_ids=tokens,
                                                                     sampling=GREEDY, images=local), timeout=60)
                for t in d.token_ids]
    expected = reference_tokens(model, tokens, spans)
    assert disaggregated == together == expected


def test_encode_worker_gone_falls_back_to_the_bytes(stack):
    _, _, stubs = stack
    data = png(3, 40, 40)
    tokens, spans = prompt([data], where=[3])
    gone = pb.PromptImage(offset=spans[0][0], length=TOKENS, digest=digest(data), source_endpoint="127.0.0.1:1",
                          data=data)
    deltas = list(stubs["both"].Generate(pb.GenerateRequest(request_id="mm-3", prompt_token_ids=tokens,
                                                            sampling=GREEDY, images=[gone]), timeout=60))
    assert sum(len(d.token_ids) for d in deltas) == 12


@pytest.mark.parametrize(("case", "code"), [
    ("corrupt", grpc.StatusCode.INVALID_ARGUMENT),
    ("digest mismatch", grpc.StatusCode.INVALID_ARGUMENT),
    ("not cached, no bytes", grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong length", grpc.StatusCode.INVALID_ARGUMENT),
    ("not image tokens", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_images_are_refused_and_the_worker_serves_on(stack, case, code):
    _, _, stubs = stack
    data = png(4, 30, 30)
    tokens, spans = prompt([data], where=[1])
    image = pb.PromptImage(offset=spans[0][0], length=TOKENS, digest=digest(data), data=data)
    if case == "corrupt":
        image.data = data[:40]
        image.digest = digest(image.data)
    elif case == "digest mismatch":
        image.digest = digest(b"another image")
    elif case == "not cached, no bytes":
        image.digest, image.data = digest(b"never seen"), b""
    elif case == "wrong length":
        image.length = TOKENS - 1
    else:
        image.offset = spans[0][0] + 1
    with pytest.raises(grpc.RpcError) as error:
        list(stubs["both"].Generate(pb.GenerateRequest(request_id=f"bad-{case}", prompt_token_ids=tokens,
                                                       sampling=GREEDY, images=[image]), timeout=60))
    assert error.value.code() == code, error.value.details()
    ok = list(stubs["both"].Generate(pb.GenerateRequest(request_id=f"after-{case}", prompt_token_ids=TEXT,
                                                        sampling=GREEDY), timeout=60))
    assert sum(len(d.token_ids) for d in ok) == 12


def test_roles_and_unknown_embeddings(stack):
    _, _, stubs = stack
    with pytest.raises(grpc.RpcError) as error:
        stubs["prefill"].Encode(pb.EncodeRequest(data=png(5, 20, 20)), timeout=30)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as error:
        stubs["encode"].Encode(pb.EncodeRequest(data=b"GIF89a not really"), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        list(stubs["encode"].ReadEmbeddings(pb.ReadEmbeddingsRequest(digest=digest(b"unknown")), timeout=30))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_image_counts_and_spans_are_checked_before_any_work(stack):
    _, _, stubs = stack
    data = png(6, 20, 20)
    many = [pb.PromptImage(offset=i * TOKENS, length=TOKENS, digest=digest(data)) for i in range(5)]
    kv = pb.KvTransferParams(request_id="x", source_endpoint="127.0.0.1:1")  # never read: refused first
    with pytest.raises(grpc.RpcError) as error:
        list(stubs["decode"].Decode(pb.DecodeRequest(request_id="many", prompt_token_ids=[IMAGE_TOKEN] * 80,
                                                     sampling=GREEDY, kv=kv, images=many), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 4" in error.value.details()
    wrong = pb.PromptImage(offset=0, length=TOKENS - 1, digest=digest(data), data=data)
    with pytest.raises(grpc.RpcError) as error:
        stubs["prefill"].Prefill(pb.PrefillRequest(request_id="wrong", prompt_token_ids=[IMAGE_TOKEN] * TOKENS,
                                                   sampling=GREEDY, images=[wrong]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens with this model" in \
        error.value.details()
