"""A steady load on the OpenAI API for tests that watch the stack react to it (role switching)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import openai


class Load:
    """Chat completions from `lanes` concurrent clients (half streamed) until stopped; `done` holds
    each completed request's completion tokens, `failed` each error. `unique` puts a number in front
    of each prompt, so that the prefix cache cannot make a repeated prompt free to prefill."""

    def __init__(self, url: str, prompt: str, max_tokens: int, lanes: int, *, unique: bool = False) -> None:
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        self.prompt, self.unique, self.sent = prompt, unique, 0
        self.max_tokens = max_tokens
        self.done: list[int] = []
        self.failed: list[str] = []
        self.stopping = False
        self.lanes = [asyncio.create_task(self._lane(i)) for i in range(lanes)]

    async def _lane(self, lane: int) -> None:
        model = (await self.client.models.list()).data[0].id
        for _ in range(10_000):  # bounded; stopped long before
            if self.stopping:
                return
            self.sent += 1
            content = f"{lane}.{self.sent} {self.prompt}" if self.unique else self.prompt
            request = {"messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens}
            try:
                if lane % 2:
                    stream = await self.client.chat.completions.create(
                        model=model, stream=True, stream_options={"include_usage": True}, **request)
                    chunks = [c async for c in stream]
                    usage = chunks[-1].usage
                else:
                    usage = (await self.client.chat.completions.create(model=model, **request)).usage
                self.done.append(usage.completion_tokens if usage else 0)
            except (openai.APIError, OSError) as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        self.stopping = True
        await asyncio.wait_for(asyncio.gather(*self.lanes), timeout=120)
        await self.client.close()


@contextlib.contextmanager
def load_in_background(url: str, prompt: str, max_tokens: int, lanes: int, *, unique: bool = False,
                       ) -> Iterator[Load]:
    """A `Load` on an event loop of its own thread, for synchronous tests; stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> Load:
        return Load(url, prompt, max_tokens, lanes, unique=unique)

    load = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield load
    finally:
        asyncio.run_coroutine_threadsafe(load.stop(), loop).result(timeout=180)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
