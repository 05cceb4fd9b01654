"""`--engine sim`: the real engine bookkeeping around a timing model instead of a model.

Scheduling, continuous batching, the KV block pool and prefix cache, stop conditions, export and
import all run as in a real worker; only the forward pass is replaced by a sleep whose length
follows `SimTiming`, and tokens come from a deterministic function of the context (so a request
resumed on another simulated worker continues identically). The KV tensor is tiny (one layer, one
head of width 8) but real, so NIXL and the gRPC stream move actual bytes. It lets tests and
benchmarks run dozens of workers on one machine.

The simulated model is certain of each token it picks: logprobs (of the output and of the prompt)
are 0 for the token and list no others. A request with a grammar gets the first token the grammar
allows at or after the simulated one, so structured output is well-formed here too; penalties and
logit bias have no effect on a model without logits.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from triphase.common.block_hash import hash_block_tokens
from triphase.common.models.files import load_tokenizer
from triphase.workers.engine.core import Engine, EngineConfig, kv_layout_for
from triphase.workers.engine.model_runner import ModelRunner
from triphase.workers.engine.request import Request
from triphase.workers.engine.sampler import Sample
from triphase.workers.engine.scheduler import SchedulerOutput
from triphase.workers.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SimTiming:
    """Seconds per step: prefill_base + prefill_per_token * prefill tokens, plus, when the step
    decodes, decode_base + decode_per_seq * sequences + decode_per_context_token * their context."""

    prefill_base_s: float = 0.010
    prefill_per_token_s: float = 0.0
    decode_base_s: float = 0.010
    decode_per_seq_s: float = 0.0
    decode_per_context_token_s: float = 0.0

    def step_seconds(self, output: SchedulerOutput) -> float:
        prefill_tokens = sum(i.num_new_tokens for i in output.scheduled if i.num_new_tokens > 1 or i.start == 0)
        decodes = [i for i in output.scheduled if i.num_new_tokens == 1 and i.start > 0]
        seconds = 0.0
        if prefill_tokens:
            seconds += self.prefill_base_s + self.prefill_per_token_s * prefill_tokens
        if decodes:
            seconds += (self.decode_base_s + self.decode_per_seq_s * len(decodes)
                        + self.decode_per_context_token_s * sum(i.start for i in decodes))
        return seconds


def sim_token(context: list[int], vocab: int, avoid: frozenset[int]) -> int:
    """The simulated next token: a function of the last few tokens and the position only."""
    token = hash_block_tokens(len(context), context[-4:]) % vocab
    while token in avoid:
        token = (token + 1) % vocab
    return token


class SimRunner(ModelRunner):
    def __init__(self, layout, timing: SimTiming, vocab: int, avoid: frozenset[int]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(None, layout)
        self.timing = timing
        self.vocab = vocab
        self.avoid = avoid

    def execute(self, output: SchedulerOutput) -> dict[str, Sample]:
        pause = self.timing.step_seconds(output)
        if pause > 0:
            time.sleep(pause)  # the simulated forward pass
        samples = {}
        for item in output.scheduled:
            request = item.request
            if request.sampling.prompt_logprobs is not None:
                end = min(item.start + item.num_new_tokens, request.num_prompt_tokens - 1)
                while len(request.prompt_logprobs) <= end and len(request.prompt_logprobs) > item.start:
                    request.prompt_logprobs.append({request.token_ids[len(request.prompt_logprobs)]: 0.0})
            if item.samples:
                token = self._allowed(request, sim_token(request.token_ids, self.vocab, self.avoid))
                samples[request.request_id] = Sample(token, {token: 0.0} if request.sampling.logprobs is not None
                                                     else None)
        return samples

    def _allowed(self, request: Request, token: int) -> int:
        """`token`, or the first token its grammar allows after it (wrapping around the vocabulary)."""
        if request.constraint is None:
            return token
        allowed = request.constraint.allowed(self.vocab)
        if not len(allowed):
            return token
        return int(allowed[np.searchsorted(allowed, token) % len(allowed)])


SIM_MODEL = ModelConfig(architecture="sim", vocab_size=0, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                        rope_theta=1.0, max_position_embeddings=8192, tie_word_embeddings=True, name="sim")


def simulated_engine(model_path: str | None, config: EngineConfig, timing: SimTiming,
                     tokenizer_path: str | None = None) -> Engine:
    """An engine with the model's tokenizer (or the one at `tokenizer_path`) and a simulated forward
    pass (never EOS unless asked)."""
    tokenizer, name = load_tokenizer(model_path, tokenizer_path)
    cfg = dataclasses.replace(SIM_MODEL, vocab_size=tokenizer.vocab_size, name=name,
                              eos_token_ids=tuple(tokenizer.eos_token_ids))
    layout = kv_layout_for(cfg, dataclasses.replace(config, dtype="float32"))
    engine = Engine.__new__(Engine)
    avoid = frozenset(tokenizer.eos_token_ids) | frozenset(range(min(3, cfg.vocab_size)))
    engine._setup(cfg, tokenizer, model_path or "bundled", config,
                  SimRunner(layout, timing, cfg.vocab_size, avoid))
    return engine
