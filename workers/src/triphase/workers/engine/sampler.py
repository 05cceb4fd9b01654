"""Turn a row of logits into the next token: greedy, temperature, top-k, top-p, seeded draws, logprobs.

A seeded request draws token i from a generator seeded with (seed, i), so its samples depend only
on its own logits: not on the batch, on preemption, or on which engine produced earlier tokens
(a request prefilled on one engine and decoded on another samples as if one engine did it all).

Logits may live on a GPU. A step reads back from it once: the argmax ids when every row is greedy
without logprobs, else the logits themselves, and every draw is made on the host with host
generators, so a seeded request samples the same tokens from the same logits on any device.
"""

from __future__ import annotations

import dataclasses

import torch

from triphase.workers.engine.sampling import SamplingParams

_MASK63 = (1 << 63) - 1


@dataclasses.dataclass
class Sample:
    token_id: int
    logprobs: dict[int, float] | None = None  # chosen token first, then the top-N


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int],
           default_generator: torch.Generator) -> list[Sample]:
    """logits [N, V] float32; `output_index[i]` is how many tokens row i's request already has."""
    if logits.device.type != "cpu":
        if all(p.greedy and p.logprobs is None for p in params):
            return [Sample(int(t)) for t in logits.argmax(dim=-1).tolist()]
        logits = logits.cpu()
    greedy = logits.argmax(dim=-1).tolist()
    results: list[Sample] = []
    logprob_rows = None
    if any(p.logprobs is not None for p in params):
        logprob_rows = torch.log_softmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.greedy:
            token = int(greedy[row])
        else:
            probs = _filtered_probs(logits[row], p)
            generator = default_generator
            if p.seed is not None:
                generator = torch.Generator().manual_seed((p.seed * 1_000_003 + output_index[row]) & _MASK63)
            token = int(torch.multinomial(probs, 1, generator=generator).item())
        result = Sample(token)
        if p.logprobs is not None and logprob_rows is not None:
            lp = logprob_rows[row]
            chosen = {token: float(lp[token])}
            if p.logprobs:
                values, ids = torch.topk(lp, p.logprobs)
                for v, i in zip(values.tolist(), ids.tolist(), strict=True):
                    chosen.setdefault(int(i), float(v))
            result.logprobs = chosen
        results.append(result)
    return results
