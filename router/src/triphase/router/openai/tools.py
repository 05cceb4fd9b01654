"""Tools: how a request's tool definitions reach the model, and how its output becomes `tool_calls`.

One format for every model, the one Hermes-style templates (Qwen2.5, Qwen3, ...) teach: a call is
a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>` lines.

- Rendering: a chat template that renders tools itself (it mentions `tools`) gets them, with the
  conversation's tool calls and tool results in Hugging Face's message shape. Otherwise (SmolLM2's
  template, for one) the fallback: a system prompt describing the tools and the format, earlier
  calls written back in that format, and tool results as `<tool_response>` user turns.
- `tool_choice: required` or a named function: the output is constrained by a grammar to one or more
  calls (one when `parallel_tool_calls` is false) of the allowed functions, each `arguments` valid
  against the function's `parameters`: it always parses. `auto`: the model's free output is parsed;
  text outside the call tags is the message content. `none`: tools are described, nothing is parsed.
- Streaming: content streams as it comes, except text that may be the start of a call tag, which is
  held back until it is known; a call is sent as two deltas once it is complete (its id, type and
  name, then its whole arguments), as OpenAI shapes `tool_calls` deltas.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from triphase.common import grammar
from triphase.router.errors import BadRequest
from triphase.router.openai import protocol as p

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclasses.dataclass
class Call:
    name: str
    arguments: str  # JSON text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Plan:
    """What the template gets and how the output is read."""

    rows: list[dict[str, Any]]  # the template's messages
    template_tools: list[dict[str, Any]] | None  # for a template that renders tools itself
    grammar: str  # "" unless the choice constrains the output
    parse: bool  # read tool calls out of the output
    known: set[str] = dataclasses.field(default_factory=set)  # the functions a call may name
    offset: int = 0  # rows before the first message's own (a system prompt added for the tools)

    @property
    def constrained(self) -> bool:
        return bool(self.grammar)


def _arguments(call: p.ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments  # the template shows it as the client sent it


def _system_prompt(tools: list[p.Tool]) -> str:
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return ("# Tools\n\nYou may call one or more of these functions to answer. Their signatures, one per line, "
            f"between <tools> tags:\n<tools>\n{lines}\n</tools>\n\nTo call a function, write a JSON object with "
            f"its name and arguments between {OPEN} tags, one call per tag:\n{OPEN}\n"
            f'{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{CLOSE}')


def _written_call(call: p.ToolCall) -> str:
    return f"{OPEN}\n{json.dumps({'name': call.function.name, 'arguments': _arguments(call)})}\n{CLOSE}"


def plan(req: p.ChatCompletionRequest, template_knows_tools: bool) -> Plan:
    tools = req.tools or []
    choice = req.tool_choice or ("auto" if tools else "none")
    native = template_knows_tools and bool(tools)
    rows: list[dict[str, Any]] = []
    for m in req.messages:
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            if native:
                rows.append({"role": "assistant", "content": text, "tool_calls": [
                    {"type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                    for c in m.tool_calls]})
            else:
                rows.append({"role": "assistant", "content": "\n".join(
                    [text] * bool(text) + [_written_call(c) for c in m.tool_calls])})
        elif m.role == "tool":
            rows.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id} if native else
                        {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        else:
            rows.append({"role": m.role, "content": text})
    offset = 0
    if tools and not native:
        prompt = _system_prompt(tools)
        if rows and rows[0]["role"] in ("system", "developer"):
            rows[0] = {**rows[0], "content": f"{rows[0]['content']}\n\n{prompt}"}
        else:
            rows.insert(0, {"role": "system", "content": prompt})
            offset = 1
    template_tools = [t.model_dump(exclude_none=True) for t in tools] if native else None
    if choice == "none" or not tools:
        return Plan(rows, template_tools, "", False, offset=offset)
    if choice == "auto":
        return Plan(rows, template_tools, "", True, {t.function.name for t in tools}, offset)
    allowed = tools if choice == "required" else \
        [t for t in tools if isinstance(choice, p.NamedToolChoice) and t.function.name == choice.function.name]
    return Plan(rows, template_tools, _calls_grammar(allowed, req.parallel_tool_calls),
                True, {t.function.name for t in allowed}, offset)


def _calls_grammar(tools: list[p.Tool], parallel: bool) -> str:
    """One call (or several, newline-separated, when parallel) of the given functions."""
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                 "properties": {"name": {"const": t.function.name},
                                "arguments": t.function.parameters or {"type": "object"}}} for t in tools]
    schema = {"anyOf": variants, "x-guidance": grammar.JSON_OPTIONS}
    try:
        grammar.check_schema(schema)
        body = json.dumps(schema)
        repeat = ' ("\\n" call)*' if parallel else ""
        return grammar.lark(f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {body}')
    except grammar.GrammarError as exc:
        raise BadRequest(f"the tools' parameters cannot be used: {exc}", param="tools",
                         code="invalid_schema") from None


def parse(text: str, known: set[str]) -> tuple[str | None, list[Call]]:
    """(content, calls) of a whole output: every well-formed call of a known function, in order; the
    text outside them is the content (None when only whitespace). A malformed call stays content."""
    calls: list[Call] = []
    content: list[str] = []
    rest = text
    while (start := rest.find(OPEN)) >= 0:
        end = rest.find(CLOSE, start)
        if end < 0:
            break
        call = _call(rest[start + len(OPEN) : end], known)
        if call is None:
            content.append(rest[: end + len(CLOSE)])
        else:
            content.append(rest[:start])
            calls.append(call)
        rest = rest[end + len(CLOSE) :]
    content.append(rest)
    joined = "".join(content).strip() if calls else "".join(content)
    return (joined or None) if calls else joined, calls


def _call(body: str, known: set[str]) -> Call | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in known:
        return None
    arguments = value.get("arguments", {})
    return Call(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class StreamParser:
    """The streaming form of `parse`: `feed` returns the content safe to send now (text that cannot be
    part of a call tag) and the calls completed by this piece."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self._pending = ""  # text held back: a call in progress, or what may begin a tag
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[Call]]:
        self._pending += text
        out: list[str] = []
        calls: list[Call] = []
        while True:
            start = self._pending.find(OPEN)
            if start < 0:
                keep = _partial_prefix(self._pending, OPEN)
                out.append(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                break
            end = self._pending.find(CLOSE, start)
            if end < 0:
                out.append(self._pending[:start])
                self._pending = self._pending[start:]
                break
            call = _call(self._pending[start + len(OPEN) : end], self.known)
            if call is None:
                out.append(self._pending[: end + len(CLOSE)])
            else:
                out.append(self._pending[:start])
                calls.append(call)
            self._pending = self._pending[end + len(CLOSE) :]
        self.calls += len(calls)
        text_out = "".join(out)
        if self.calls:  # once calls are made, whitespace between them is not content
            text_out = text_out if text_out.strip() else ""
        return text_out, calls

    def flush(self) -> str:
        """What is left at the end (an unfinished tag is content after all)."""
        pending, self._pending = self._pending, ""
        return pending if not self.calls or pending.strip() else ""


def _partial_prefix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
