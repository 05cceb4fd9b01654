"""OpenAI request validation: unknown fields refused, unimplemented ones accepted only when off,
every client-controlled number and count bounded."""

from __future__ import annotations

import pytest

from triphase.router.errors import BadRequest
from triphase.router.openai import protocol as p

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"made_up": 1}, "made_up"),
    ({"seed": 2**70}, "seed"),
    ({"top_k": 2**40}, "top_k"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "x" * 257}, "stop"),
    ({"n": 17}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "b": 1}}]}]},
     "messages.0.content.0.image_url.b"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}] * 2049}, "messages"),
])
def test_refused_with_the_field_named(extra, param):
    with pytest.raises(BadRequest) as err:
        p.parse(p.ChatCompletionRequest, {**BASE, **extra})
    assert err.value.param == param
    assert "Traceback" not in err.value.message


@pytest.mark.parametrize("extra", [
    {"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}}, {"logprobs": False},
    {"frequency_penalty": 0}, {"presence_penalty": 0.0}, {"user": "u"}, {"store": False},
    {"logprobs": True, "top_logprobs": 20}, {"frequency_penalty": -2, "presence_penalty": 2, "min_p": 0.1},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": True}}},
    {"logit_bias": {"12": -100, "7": 100}},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
                                               {"type": "text", "text": "what is it?"}]}]},
    {"stop": ["a", "b"], "seed": -(2**63), "top_k": 40, "stream_options": {"include_usage": True}},
])
def test_accepted_when_off_or_harmless(extra):
    req = p.parse(p.ChatCompletionRequest, {**BASE, **extra})
    assert req.model == "m"
