"""OpenAI request models, validated with pydantic, and response bodies.

Validation errors become `BadRequest` naming the offending field, so clients get OpenAI-style
400 bodies (`param` set) instead of 500s. As OpenAI does, a field this server does not know is
refused, not ignored; a field it knows but does not implement (`tools`, `response_format`, ...)
is accepted only with the value that means "off". Every count and size a client controls is
bounded here, before any work is done on it (a grammar's own bounds are common/grammar.py's).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic

from triphase.common.sampling import MAX_CHOICES
from triphase.router.errors import BadRequest

MAX_MESSAGES = 2048
MAX_STOP_STRINGS = 16  # the worker's limits (SamplingParams); OpenAI allows 4
MAX_STOP_CHARS = 256
INT32_MAX = (1 << 31) - 1

MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's chat limit; its completions allow 5)
MAX_LOGIT_BIAS = 300  # entries, OpenAI's limit
MAX_STOP_TOKEN_IDS = 64
# Known OpenAI fields this server does not implement, with the values that leave them off.
MAX_TOOLS = 128  # OpenAI's limit
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none", "auto"),  # the deprecated forms of `tools`
    "best_of": (None, 1), "suffix": (None, ""), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
}
# Accepted and without effect here: bookkeeping fields clients send routinely.
IGNORED = ("user", "store", "metadata", "service_tier", "reasoning_effort")


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str = pydantic.Field(min_length=1)  # its length is bounded by the image limits, in images.py
    detail: Literal["auto", "low", "high"] = "auto"  # one resolution per model here: accepted, no effect


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


def _part_type(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "Text", "image_url": "Image"}.get(kind) if isinstance(kind, str) else None


# Tagged by capitalized names, which `parse` leaves out of the field path it reports.
Part = Annotated[Annotated[TextPart, pydantic.Tag("Text")] | Annotated[ImagePart, pydantic.Tag("Image")],
                 pydantic.Discriminator(_part_type, custom_error_type="invalid_part",
                                        custom_error_message="a content part's type must be text or image_url")]


FunctionName = Annotated[str, pydantic.StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str  # JSON, as the model wrote it


class ToolCall(_Strict):
    id: str = pydantic.Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[Part], pydantic.Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], pydantic.Field(max_length=MAX_TOOLS)] | None = None  # assistant
    tool_call_id: str | None = pydantic.Field(default=None, max_length=256)  # tool: the call it answers

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def images(self) -> list[ImageUrl]:
        if self.content is None or isinstance(self.content, str):
            return []
        return [part.image_url for part in self.content if isinstance(part, ImagePart)]


Stop = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Penalty = Annotated[float, pydantic.Field(ge=-2, le=2)]
TokenId = Annotated[int, pydantic.Field(ge=0, le=INT32_MAX)]


class JsonSchemaFormat(_Strict):
    name: str = pydantic.Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = pydantic.Field(default=None, alias="schema")
    strict: bool | None = None  # the output always follows the schema here: strict or not


class ResponseFormat(_Strict):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON that validates against it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @pydantic.model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when the type is json_schema")
        return self


class StructuredOutputs(_Strict):
    """An extension (vLLM's name and shape): exactly one of a JSON schema, a regular expression, a
    Lark grammar, or a list of strings the output must be one of."""

    json_: dict[str, Any] | None = pydantic.Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: Annotated[list[str], pydantic.Field(min_length=1, max_length=256)] | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if sum(x is not None for x in (self.json_, self.regex, self.grammar, self.choice)) != 1:
            raise ValueError("give exactly one of json, regex, grammar, choice")
        return self


class SamplingFields(_Strict):
    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=0)  # 0: completions with echo only (scoring)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0, le=2)
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1)
    top_k: int = pydantic.Field(default=-1, ge=-1, le=INT32_MAX)
    seed: int | None = pydantic.Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: Stop | Annotated[list[Stop], pydantic.Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = pydantic.Field(default=1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float = pydantic.Field(default=1.0, gt=0, le=2)
    min_p: float = pydantic.Field(default=0.0, ge=0, le=1)
    logit_bias: Annotated[dict[str, Annotated[float, pydantic.Field(ge=-100, le=100)]],
                          pydantic.Field(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: int = pydantic.Field(default=0, ge=0)
    stop_token_ids: Annotated[list[TokenId], pydantic.Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, body: Any) -> Any:
        if isinstance(body, dict):
            for name, off in UNSUPPORTED.items():
                if name in body:
                    if body[name] not in off:
                        raise BadRequest(f"`{name}` is not supported by this server", param=name,
                                         code="unsupported_parameter")
                    body = {k: v for k, v in body.items() if k != name}
        return body

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs; its keys are token ids written as strings (JSON)."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) > INT32_MAX:
                raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            pairs.append((int(key), value))
        return tuple(sorted(pairs))

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (bounded as any other: common/grammar.py)
    strict: bool | None = None  # arguments always follow `parameters` when the output is constrained


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = pydantic.Field(min_length=1, max_length=MAX_MESSAGES)
    tools: Annotated[list[Tool], pydantic.Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=MAX_LOGPROBS)

    @pydantic.model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        return self

    @pydantic.model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise BadRequest("tool function names must be unique", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise BadRequest(f"tool_choice names `{choice.function.name}`, which is not among the tools",
                             param="tool_choice")
        if choice in ("required",) and not names:
            raise BadRequest("tool_choice `required` needs tools", param="tool_choice")
        return self

    @property
    def logprobs_n(self) -> int | None:
        """Top logprobs per token to return; None: none at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False  # with logprobs: the prompt's tokens' logprobs too (what evaluation harnesses score)
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def logprobs_n(self) -> int | None:
        return self.logprobs

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) back, nothing generated."""
        return self.max_tokens == 0


def parse(model: type[pydantic.BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        # A union field reports one error per member; the member of the input's own type says most.
        first = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
        param = ".".join(str(p) for p in first["loc"] if _is_field(p)) or None
        if first["type"] == "extra_forbidden":
            raise BadRequest(f"unrecognized request argument: `{param}`", param=param,
                             code="unsupported_parameter") from None
        raise BadRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                         code="invalid_value") from None


def _is_field(part: int | str) -> bool:
    """A loc part that names a field or an index (not a union member's tag like `list[str]`)."""
    return isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _TYPE_TAGS)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def created() -> int:
    return int(time.time())
