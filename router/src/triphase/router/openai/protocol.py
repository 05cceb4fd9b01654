"""OpenAI request models, validated with pydantic, and response bodies.

Validation errors become `BadRequest` naming the offending field, so clients get OpenAI-style
400 bodies (`param` set) instead of 500s. As OpenAI does, a field this server does not know is
refused, not ignored; a field it knows but does not implement (`tools`, `response_format`, ...)
is accepted only with the value that means "off". Every count and size a client controls is
bounded here, before any work is done on it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic

from triphase.router.errors import BadRequest

MAX_MESSAGES = 2048
MAX_STOP_STRINGS = 16  # the worker's limits (SamplingParams); OpenAI allows 4
MAX_STOP_CHARS = 256
INT32_MAX = (1 << 31) - 1

# Known OpenAI fields this server does not implement, with the values that leave them off.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1), "best_of": (None, 1), "suffix": (None, ""), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "min_p": (None, 0), "web_search_options": (None,),
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


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[Part], pydantic.Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = None

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


class SamplingFields(_Strict):
    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0, le=2)
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1)
    top_k: int = pydantic.Field(default=-1, ge=-1, le=INT32_MAX)
    seed: int | None = pydantic.Field(default=None, ge=-(1 << 63), le=(1 << 63) - 1)
    stop: Stop | Annotated[list[Stop], pydantic.Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = pydantic.Field(default=1, ge=1, le=1)
    ignore_eos: bool = False
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
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = pydantic.Field(min_length=1, max_length=MAX_MESSAGES)


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False


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
