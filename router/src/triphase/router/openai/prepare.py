"""Request preparation, the stages before the pipeline: parse and validate the JSON, check the model,
build the grammar (structured.py) and the tools' plan (tools.py), fetch the images, apply the chat
template and tokenize, and turn the sampling fields into the workers' `Sampling`.

Nothing here knows the web framework; each stage is a plain function of its inputs that raises
`BadRequest` (a 400 naming the field) for what the client got wrong, before any worker time is spent.
The routes decide which stages run off the event loop (large bodies: on the parsing thread).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from triphase.common.images import ImageLimits
from triphase.common.models.tokenizer import ImageSlot, Tokenizer
from triphase.common.models.vision import VisionConfig
from triphase.common.sampling import DEFAULT_MAX_TOKENS
from triphase.router.errors import BadRequest
from triphase.router.openai import protocol as p
from triphase.router.openai import tools
from triphase.router.openai.images import ImageSources, LoadedImage
from triphase.router.openai.images import load as load_image
from triphase.router.openai.structured import grammar_for
from triphase.router.worker_client import PromptImage, Sampling

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe a lone surrogate


class Preparer:
    """The model's side of preparation: its name, context length, tokenizer and image settings."""

    def __init__(self, tokenizer: Tokenizer, *, model: str, max_model_len: int, vision: VisionConfig | None = None,
                 image_sources: ImageSources | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len
        self.vision = vision  # the model's image settings; None: it takes no images
        self.image_sources = image_sources or ImageSources(ImageLimits())
        # No prompt of more bytes than this fits the context: each token stands for at most this many.
        self.max_prompt_bytes = max_model_len * tokenizer.max_token_bytes

    @staticmethod
    def parse_json(body: bytes) -> Any:
        """The body as JSON: a 400 for invalid JSON, nesting too deep or a lone surrogate."""
        try:
            value = json.loads(body)
            if _SURROGATE_ESCAPE.search(body):  # valid pairs decode to one character; lone ones cannot be encoded
                json.dumps(value, ensure_ascii=False).encode()
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            reason = "nested too deeply" if isinstance(exc, RecursionError) else \
                "has a lone UTF-16 surrogate" if isinstance(exc, UnicodeEncodeError) else \
                f"is not valid JSON ({exc})"
            raise BadRequest(f"the request body {reason}", code="invalid_json") from None
        return value

    def _check_text_size(self, text_bytes: int, param: str) -> None:
        if text_bytes > self.max_prompt_bytes:
            raise BadRequest(f"the prompt ({text_bytes} bytes) cannot fit this model's context length "
                             f"{self.max_model_len}", param=param, code="context_length_exceeded")

    def parse_chat(self, body: bytes) -> tuple[p.ChatCompletionRequest, str, tools.Plan]:
        """The request, the grammar its output must follow ("" for none) and how its tools are used."""
        req: p.ChatCompletionRequest = p.parse(p.ChatCompletionRequest, self.parse_json(body))
        self._check_model(req)  # before the costly part
        self._check_text_size(sum(len(m.text().encode()) for m in req.messages), "messages")
        count = sum(len(m.images) for m in req.messages)
        if count and self.vision is None:
            raise BadRequest(f"the model `{self.model}` does not take images", param="messages",
                             code="invalid_image")
        if count > self.image_sources.limits.max_images:
            raise BadRequest(f"{count} images; at most {self.image_sources.limits.max_images} per request",
                             param="messages", code="invalid_image")
        plan = tools.plan(req, self.tokenizer.renders_tools)
        grammar = grammar_for(req)
        if plan.constrained and grammar:
            raise BadRequest("a required or named tool call cannot be combined with a response format",
                             param="tool_choice")
        return req, plan.grammar or grammar, plan

    async def load_images(self, req: p.ChatCompletionRequest) -> list[LoadedImage]:
        """The request's images in order, fetched and checked at once (a 400 names the first bad one)."""
        places = [(f"messages.{i}.content.{j}.image_url", part.image_url.url)
                  for i, m in enumerate(req.messages) if isinstance(m.content, list)
                  for j, part in enumerate(m.content) if isinstance(part, p.ImagePart)]
        return list(await asyncio.gather(*(load_image(url, self.image_sources, param) for param, url in places)))

    def chat_tokens(self, req: p.ChatCompletionRequest, loaded: list[LoadedImage], plan: tools.Plan,
                     ) -> tuple[list[int], list[PromptImage]]:
        try:
            if not loaded:
                return self.tokenizer.encode_chat(plan.rows, plan.template_tools), []
            assert self.vision is not None  # _parse_chat refused images otherwise
            slot = ImageSlot(self.vision.image_token_id, self.vision.tokens_per_image)
            messages = [dict(row) for row in plan.rows]
            for i, m in enumerate(req.messages):
                if isinstance(m.content, list):
                    messages[i + plan.offset]["content"] = [
                        part.text if isinstance(part, p.TextPart) else slot for part in m.content]
            ids, offsets = self.tokenizer.encode_chat_with_images(messages, plan.template_tools)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        return ids, [PromptImage(at, slot.count, image.digest, image.data)
                     for at, image in zip(offsets, loaded, strict=True)]

    def completion_prompt(self, body: bytes) -> tuple[p.CompletionRequest, list[int], str]:
        req = p.parse(p.CompletionRequest, self.parse_json(body))
        self._check_model(req)
        if req.score_only and not req.echo:
            raise BadRequest("max_tokens 0 needs echo (it returns the prompt, and its logprobs, only)",
                             param="max_tokens")
        if isinstance(req.prompt, str):
            self._check_text_size(len(req.prompt.encode()), "prompt")
            prompt = self.tokenizer.encode(req.prompt)
        else:
            if len(req.prompt) >= self.max_model_len:
                raise BadRequest(f"the prompt has {len(req.prompt)} tokens; this model's context length is "
                                 f"{self.max_model_len}", param="prompt", code="context_length_exceeded")
            vocab = self.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise BadRequest(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        return req, prompt, grammar_for(req)

    def _check_model(self, req: p.SamplingFields) -> None:
        if req.model != self.model:
            raise BadRequest(f"the model `{req.model}` does not exist; this server serves `{self.model}`",
                             param="model", code="model_not_found")

    def sampling(self, req: p.ChatCompletionRequest | p.CompletionRequest, prompt_len: int, grammar: str,
                 ) -> Sampling:
        """The workers' sampling parameters. max_tokens, when the request names none: the room the
        context leaves for a chat, DEFAULT_MAX_TOKENS (within that room) for a completion."""
        chat = isinstance(req, p.ChatCompletionRequest)
        prompt_param = "messages" if chat else "prompt"
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise BadRequest(f"the prompt has {prompt_len} tokens; this model's context length is "
                             f"{self.max_model_len}", param=prompt_param, code="context_length_exceeded")
        limit = 1 if isinstance(req, p.CompletionRequest) and req.score_only else \
            req.limit or (room if chat else min(DEFAULT_MAX_TOKENS, room))
        if limit > room:
            raise BadRequest(f"max_tokens ({limit}) plus the prompt ({prompt_len} tokens) exceeds the context "
                             f"length {self.max_model_len}", param="max_tokens", code="context_length_exceeded")
        if req.min_tokens > limit:
            raise BadRequest(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({limit})", param="min_tokens")
        vocab = self.tokenizer.vocab_size
        bias = req.bias
        for param, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", req.stop_token_ids or [])):
            if any(t >= vocab for t in ids):
                raise BadRequest(f"{param}: token ids must be in 0..{vocab - 1}", param=param)
        return Sampling(max_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        seed=req.seed, stop=tuple(req.stop_list), ignore_eos=req.ignore_eos,
                        logprobs=req.logprobs_n, presence_penalty=req.presence_penalty,
                        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                        min_p=req.min_p, logit_bias=bias, min_tokens=req.min_tokens,
                        stop_token_ids=tuple(req.stop_token_ids or ()), grammar=grammar, n=req.n,
                        prompt_logprobs=req.logprobs if isinstance(req, p.CompletionRequest) and req.echo else None)
