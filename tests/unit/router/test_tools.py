"""Tools: the template's messages, the grammar for required and named choices, and reading calls out of
output whole and streamed."""

from __future__ import annotations

import json

import llguidance
import pytest

from triphase.common.models.files import load_tokenizer
from triphase.router.errors import BadRequest
from triphase.router.openai import protocol as p
from triphase.router.openai import tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
PARIS_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def request(**extra):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER, TIME]}
    return p.parse(p.ChatCompletionRequest, {**body, **extra})


def test_fallback_prompt_describes_the_tools_and_writes_back_earlier_turns():
    req = request(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            PARIS_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}])
    plan = tools.plan(req, template_knows_tools=False)
    assert plan.rows[0]["role"] == "system" and plan.rows[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in plan.rows[0]["content"] and plan.offset == 0
    assert plan.rows[2] == {"role": "assistant", "content":
                            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert plan.rows[3] == {"role": "user", "content": "<tool_response>\n18 C, sunny\n</tool_response>"}
    assert plan.parse and not plan.constrained and plan.known == {"get_weather", "get_time"}


def test_a_template_that_renders_tools_gets_them_in_hugging_face_shape():
    req = request(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [
            PARIS_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    plan = tools.plan(req, template_knows_tools=True)
    assert plan.template_tools == [WEATHER, TIME]
    assert plan.rows[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert plan.rows[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}


def test_none_describes_but_does_not_parse():
    plan = tools.plan(request(tool_choice="none"), template_knows_tools=False)
    assert not plan.parse and plan.offset == 1 and plan.rows[0]["role"] == "system"


@pytest.fixture(scope="module")
def lltok():
    tok, _ = load_tokenizer(None)
    return tok, llguidance.LLTokenizer(tok.backend.to_str())


def accepts(lltok, grammar, text):
    tok, ll = lltok
    matcher = llguidance.LLMatcher(ll, grammar)
    return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def call(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, separators=(',', ':'))}\n</tool_call>"


def test_required_allows_only_well_formed_calls_of_the_tools(lltok):
    grammar = tools.plan(request(tool_choice="required"), False).grammar
    assert accepts(lltok, grammar, call("get_weather", {"city": "Paris"}))
    assert accepts(lltok, grammar, call("get_time", {}) + "\n" + call("get_weather", {"city": "Oslo"}))
    assert not accepts(lltok, grammar, call("get_weather", {"town": "Paris"}))
    assert not accepts(lltok, grammar, call("launch", {}))
    assert not accepts(lltok, grammar, "Sure! " + call("get_time", {}))


def test_a_named_choice_without_parallel_calls_allows_one_call_of_that_function(lltok):
    req = request(tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False)
    grammar = tools.plan(req, False).grammar
    assert accepts(lltok, grammar, call("get_weather", {"city": "Paris"}))
    assert not accepts(lltok, grammar, call("get_time", {}))
    assert not accepts(lltok, grammar, call("get_weather", {"city": "A"}) + "\n" + call("get_weather", {"city": "B"}))


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER] * 129}, "tools"),
])
def test_inconsistent_tools_are_refused(extra, param):
    with pytest.raises(BadRequest) as err:
        request(**extra)
    assert err.value.param == param


def test_unusable_parameters_are_a_400():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"$ref": "#/nowhere"}}}}}
    with pytest.raises(BadRequest) as err:
        tools.plan(request(tools=[bad], tool_choice="required"), False)
    assert err.value.param == "tools"


def test_parse_reads_calls_and_keeps_the_rest_as_content():
    text = "Let me check.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {})
    content, calls = tools.parse(text, {"get_weather", "get_time"})
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2
    assert tools.parse("no calls here", {"f"}) == ("no calls here", [])
    content, calls = tools.parse(call("unknown", {}) + " <tool_call>{broken</tool_call>", {"f"})
    assert calls == [] and "unknown" in content and "{broken" in content


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_the_stream_parser_agrees_with_parse_whatever_the_pieces(size):
    text = "Checking <b>now</b>.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {}) + "\n"
    parser = tools.StreamParser({"get_weather", "get_time"})
    content, calls = "", []
    for i in range(0, len(text), size):
        piece, new = parser.feed(text[i : i + size])
        content += piece
        calls += new
    content += parser.flush()
    whole_content, whole_calls = tools.parse(text, {"get_weather", "get_time"})
    assert content.strip() == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert "<tool" not in content
