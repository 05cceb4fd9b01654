"""Turn a row of logits into the next token: logits processing, greedy or seeded draws, logprobs.

Per row, in this order (vLLM's and OpenAI's semantics):
  1. logit_bias added;
  2. min_tokens: EOS and the stop token ids masked while fewer tokens have been generated;
  3. repetition_penalty over the prompt's and the output's distinct tokens, then frequency_penalty
     (times each token's count) and presence_penalty (once per distinct token) over the output's;
  4. the grammar's mask (tokens it does not allow next get -inf);
  5. greedy: the argmax; else temperature, top-k, top-p and min-p, and a draw.
"The output" is every token generated for the request, wherever: a request resumed here after a
failover or handed over from a prefill worker counts the tokens it was resumed with (they arrive as
the tail of its prompt, `Request.output_offset`), so it continues exactly as one process would.

Logprobs are the model's raw distribution (log-softmax of the logits before any of the above), as
vLLM reports them by default (`raw_logprobs`) and as prompt logprobs must be: a request's logprobs
do not change with its penalties or its grammar, and can be compared with any other engine's.

A seeded request draws token i from a generator seeded with (seed, i), so its samples depend only
on its own logits: not on the batch, on preemption, or on which engine produced earlier tokens.

Logits may live on a GPU. A step reads back from it once: the argmax ids when every row is greedy
without logprobs or processing, else the logits themselves; every draw is made on the host with host
generators, so a seeded request samples the same tokens from the same logits on any device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import llguidance
import llguidance.torch
import numpy as np
import torch

from triphase.workers.engine.grammar import unpack
from triphase.workers.engine.request import Request
from triphase.workers.engine.sampling import SamplingParams

_MASK63 = (1 << 63) - 1
_EXECUTOR: llguidance.LLExecutor | None = None  # computes a step's grammar masks on parallel threads


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
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def output_tokens(request: Request) -> list[int]:
    """Every token generated for the request so far, here or before it was resumed here."""
    return request.token_ids[request.num_prompt_tokens - request.output_offset :]


def _process(row: torch.Tensor, request: Request, stop_ids: Collection[int]) -> None:
    """Steps 1-3 of the module docstring, in place on one row of host float32 logits."""
    p = request.sampling
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias])
        row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype))
    output_index = request.num_output_tokens + request.output_offset
    if output_index < p.min_tokens:
        ends = sorted({*stop_ids, *p.stop_token_ids})
        row[torch.tensor(ends, dtype=torch.long)] = float("-inf")
    if not p.penalized:
        return
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(request.token_ids, dtype=torch.long).unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    output = output_tokens(request)
    if output and (p.frequency_penalty or p.presence_penalty):
        ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _apply_grammars(logits: torch.Tensor, rows: list[int], requests: Sequence[Request]) -> None:
    """Step 4 for every constrained row at once: the masks computed in parallel, then applied."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    matchers = [(requests[r].constraint.matcher, i) for i, r in enumerate(rows)]  # type: ignore[union-attr]
    llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, matchers, bitmask)
    bits = unpack(bitmask.numpy().view(np.uint8), vocab)
    index = torch.tensor(rows, dtype=torch.long)
    logits[index] = logits[index].masked_fill(torch.from_numpy(bits) == 0, float("-inf"))


def sample(logits: torch.Tensor, requests: Sequence[Request], default_generator: torch.Generator,
           stop_ids: Collection[int] = ()) -> list[Sample]:
    """logits [N, V] float32, row i for `requests[i]`; `stop_ids`: the model's EOS ids (min_tokens)."""
    params = [r.sampling for r in requests]
    plain = all(not p.processed for p in params)
    if logits.device.type != "cpu":
        if plain and all(p.greedy and p.logprobs is None for p in params):
            return [Sample(int(t)) for t in logits.argmax(dim=-1).tolist()]
        logits = logits.cpu()
    logprob_rows = None
    if any(p.logprobs is not None for p in params):
        logprob_rows = torch.log_softmax(logits, dim=-1)  # raw: before any processing
    if not plain:
        logits = logits.clone()
        for row, request in enumerate(requests):
            if request.sampling.processed:
                _process(logits[row], request, stop_ids)
        constrained = [i for i, r in enumerate(requests) if r.constraint is not None]
        if constrained:
            _apply_grammars(logits, constrained, requests)
    greedy = logits.argmax(dim=-1).tolist()
    results: list[Sample] = []
    for row, p in enumerate(params):
        if p.greedy:
            token = int(greedy[row])
        else:
            probs = _filtered_probs(logits[row], p)
            generator = default_generator
            if p.seed is not None:
                index = requests[row].num_output_tokens + requests[row].output_offset
                generator = torch.Generator().manual_seed((p.seed * 1_000_003 + index) & _MASK63)
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
