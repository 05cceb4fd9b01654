"""OpenAI request models, validated with pydantic, and response bodies.

Validation errors become `BadRequest` naming the offending field, so clients get OpenAI-style
400 bodies (`param` set) instead of 500s.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import pydantic

from triphase.router.errors import BadRequest


class _Strictish(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")


class ChatMessage(_Strictish):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
        return "".join(str(p) for p in parts)


class SamplingFields(_Strictish):
    model: str
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0, le=2)
    top_p: float = pydantic.Field(default=1.0, gt=0, le=1)
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = pydantic.Field(default=1, ge=1, le=1)
    ignore_eos: bool = False
    user: str | None = None

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
    messages: list[ChatMessage] = pydantic.Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    echo: bool = False


def parse(model: type[pydantic.BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                         code="invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def created() -> int:
    return int(time.time())
