"""The fields applications send, through `triphase up` (prefill -> NIXL -> decode) with the official
`openai` client: logprobs, penalties, logit bias, min_tokens, structured output, tools, n choices. Every
output equals the in-process engine's with the same parameters (float32), the first token drawn on
the prefill worker and the rest on the decode worker."""

from __future__ import annotations

import dataclasses
import json
import math
import urllib.error
import urllib.request

import jsonschema
import openai
import pydantic
import pytest
import torch

from triphase.common import grammar
from triphase.common.sampling import choice_seed
from triphase.local.processes import triphase_up
from triphase.workers.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
QUESTION = "Write a short story about a dragon."


@pytest.fixture(scope="module")
def stack():
    with triphase_up(["--dtype", "float32"]) as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def prompt(loaded_model):
    return loaded_model.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])


def chat(client, model, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], **kw)


def test_chat_logprobs_equal_the_engine(client, model, engine, prompt, loaded_model):
    expected = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True))[0]
    reply = chat(client, model, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
                 extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 12
    tokenizer = loaded_model.tokenizer
    for entry, token, row in zip(content, expected.token_ids, expected.logprobs, strict=True):
        assert math.isclose(entry.logprob, row[token], abs_tol=1e-4)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert tokenizer.decode([token], skip_special_tokens=False) == entry.token or "\ufffd" in entry.token
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    # streamed: the same entries, spread over the chunks
    chunks = list(chat(client, model, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True,
                       extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs(client, model, engine, loaded_model):
    prompt = loaded_model.tokenizer.encode("The capital of France is")
    expected = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True))[0]
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
                                      logprobs=2, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text == expected.text
    for value, token, row in zip(lp.token_logprobs, expected.token_ids, expected.logprobs, strict=True):
        assert math.isclose(value, row[token], abs_tol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)


@pytest.mark.parametrize("fields", [
    {"frequency_penalty": 1.2, "presence_penalty": 0.4},
    {"repetition_penalty": 1.3},
    {"temperature": 0.9, "seed": 7, "min_p": 0.05, "top_k": 40},
])
def test_penalties_across_the_hand_off_equal_the_engine(client, model, engine, prompt, fields):
    params = {"temperature": 0, **fields}
    extra = {k: params.pop(k) for k in ("repetition_penalty", "min_p", "top_k") if k in params}
    expected = engine.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True, **params, **extra))[0]
    reply = chat(client, model, max_tokens=24, extra_body={"ignore_eos": True, **extra}, **params)
    assert reply.choices[0].message.content == expected.text


def test_logit_bias_and_min_tokens(client, model, loaded_model):
    eos = loaded_model.tokenizer.eos_token_ids[0]
    bias = {str(eos): 100}
    assert chat(client, model, max_tokens=8, temperature=0, logit_bias=bias).usage.completion_tokens == 1
    held = chat(client, model, max_tokens=8, temperature=0, logit_bias=bias, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"


class Dragon(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=5000)
    colors: list[str] = pydantic.Field(max_length=3)


def test_parse_returns_a_pydantic_object(client, model):
    completion = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Describe a dragon."}], response_format=Dragon,
        max_tokens=120, temperature=0)
    dragon = completion.choices[0].message.parsed
    assert isinstance(dragon, Dragon)


def test_json_object_and_schema_streamed_equal_the_engine(client, model, engine, loaded_model):
    schema = Dragon.model_json_schema()
    messages = [{"role": "user", "content": "Describe a dragon as JSON."}]
    prompt = loaded_model.tokenizer.encode_chat(messages)
    expected = engine.generate([prompt], SamplingParams(max_tokens=120, temperature=0.8, seed=3,
                                                        grammar=grammar.json_schema(schema)))[0]
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=120, temperature=0.8, seed=3, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "dragon", "schema": schema, "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == expected.text
    jsonschema.validate(json.loads(text), schema)
    # json_object: the same tokens as the engine under the same grammar, ending in a complete object (a
    # prompt whose greedy object closes well within max_tokens, so the check is never vacuous)
    messages = [{"role": "user", "content": "Give me a JSON object with the keys name and age for a person "
                                            "called Ann who is 31."}]
    prompt = loaded_model.tokenizer.encode_chat(messages)
    free = engine.generate([prompt], SamplingParams(max_tokens=60, temperature=0, grammar=grammar.json_object()))[0]
    assert free.finish_reason == "stop"
    anything = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0,
                                              response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop" and anything.choices[0].message.content == free.text
    assert isinstance(json.loads(free.text), dict)


def test_choice_and_regex_extensions(client, model):
    picked = chat(client, model, max_tokens=8, temperature=0,
                  extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert picked.choices[0].message.content in ("red", "green", "blue")
    date = chat(client, model, max_tokens=12, temperature=0,
                extra_body={"structured_outputs": {"regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    assert len(date.choices[0].message.content) == 10


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(
        '{"type": "object", "properties": {"a": ' * 40 + '{}' + '}}' * 40)}}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
])
def test_bad_sampling_fields_get_400s(stack, model, body, param):
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    request = urllib.request.Request(f"{stack}/v1/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400
    error = json.loads(caught.value.read())["error"]
    assert error["param"] == param, error


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_tool_calls_parse(client, model):
    reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=80, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for c in calls:
        schema = (WEATHER if c.function.name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)
    # streamed: the same calls, assembled from the deltas as the client library does
    stream = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                            max_tokens=80, temperature=0, stream=True)
    pieces: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            entry = pieces.setdefault(delta_call.index, {"name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert [pieces[i] for i in sorted(pieces)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                   for c in calls]
    assert reasons[-1] == "tool_calls"


def test_a_named_function_and_the_next_turn(client, model):
    reply = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["unit"] in ("celsius",
                                                                                                   "fahrenheit")
    answer = client.chat.completions.create(model=model, tools=[WEATHER, TIME], max_tokens=20, temperature=0, messages=[
        *ASK, reply.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _transfers(stack):
    """KV hand-offs the router has timed (its transfer histogram's count)."""
    with urllib.request.urlopen(f"{stack}/metrics") as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("triphase_kv_transfer_seconds_count"))


def test_n_choices_are_seeded_handed_off_once_and_equal_the_engine(stack, client, model, engine, prompt):
    before = _transfers(stack)
    reply = chat(client, model, max_tokens=16, temperature=1.0, seed=21, n=4, extra_body={"ignore_eos": True})
    assert _transfers(stack) == before + 1  # one prefill, one hand-off for the four choices
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(reply.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert len(set(texts)) > 1 and reply.usage.completion_tokens == 64
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    alone = [engine.generate([prompt], dataclasses.replace(params, seed=choice_seed(21, i)))[0].text for i in range(4)]
    assert texts == alone
    again = chat(client, model, max_tokens=16, temperature=1.0, seed=21, n=4, stream=True,
                 extra_body={"ignore_eos": True})
    streamed = ["", "", "", ""]
    for chunk in again:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_n_completions_with_logprobs(client, model):
    reply = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0.9, seed=4,
                                      n=3, logprobs=1, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all("".join(c.logprobs.tokens) == c.text for c in reply.choices)


def test_echo_scores_a_prompt_as_evaluation_harnesses_ask(client, model, engine, loaded_model):
    """lm-eval's log-likelihood request: echo, logprobs, max_tokens 0."""
    text = "The quick brown fox jumps over the lazy dog"
    ids = loaded_model.tokenizer.encode(text)
    expected = torch.log_softmax(engine.prompt_logits(ids), dim=-1)
    reply = client.completions.create(model=model, prompt=text, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = reply.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for position in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[position], float(expected[position - 1, ids[position]]), abs_tol=1e-4)
    # streamed, with tokens generated after the prompt: the echo chunk carries the prompt's logprobs
    chunks = list(client.completions.create(model=model, prompt=ids, echo=True, logprobs=0, max_tokens=3,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    generated = [t for c in chunks[1:] for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(generated) == 3
    assert "".join(c.choices[0].text for c in chunks).startswith(first.text)


def test_max_tokens_zero_needs_echo(stack, model):
    payload = {"model": model, "prompt": "hi", "max_tokens": 0}
    request = urllib.request.Request(f"{stack}/v1/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request)
    assert caught.value.code == 400 and json.loads(caught.value.read())["error"]["param"] == "max_tokens"
