"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE), computed grouped by expert.

Routing is transformers' to the bit: router logits in the compute dtype, softmax in float32, the
top-k probabilities (renormalised over the k when the family does), cast back. The step's
(token, expert) pairs are then sorted by expert, so each expert touched runs one pair of matmuls over
all of its tokens and the Python loop is over experts touched, never over tokens; the weighted
outputs are summed back per token with one `index_add_`.

How many tokens each touched expert gets is what decides whether an expert layer is bound by memory
bandwidth (few tokens: every touched expert's weights are read for little work) or by compute; the
layer counts both sides (`ExpertLoad`) for the worker's metrics. Reading the per-expert counts back
to the host is one small device read per layer (the loop needs them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from triphase.workers.models.config import MoeConfig


@dataclasses.dataclass
class ExpertLoad:
    """Running totals over steps and sparse layers: (token, expert) pairs computed, and experts
    touched (one per expert per layer per step that got at least one token). Their ratio is the
    mean number of tokens a touched expert computes."""

    routed_tokens: int = 0
    active_experts: int = 0


class SparseMoe:
    __slots__ = ("act", "down", "gate_up", "load", "moe", "router")

    def __init__(self, moe: MoeConfig, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 act: Callable[[torch.Tensor], torch.Tensor], load: ExpertLoad) -> None:
        """router [E, H]; gate_up [E, 2I, H] (gate rows then up rows); down [E, H, I]."""
        self.moe = moe
        self.router = router
        self.gate_up = gate_up
        self.down = down
        self.act = act
        self.load = load

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.moe.top_k
        probs = F.linear(x, self.router).float().softmax(dim=-1)
        weights, experts = torch.topk(probs, k, dim=-1)  # [T, k]
        if self.moe.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)  # (token, expert) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.moe.num_experts).tolist()
        tokens = order // k
        rows = x[tokens]
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                end = start + count
                gate, up = F.linear(rows[start:end], self.gate_up[expert]).chunk(2, dim=-1)
                out[start:end] = F.linear(self.act(gate) * up, self.down[expert])
                start = end
        self.load.routed_tokens += len(flat)
        self.load.active_experts += sum(1 for c in counts if c)
        out *= weights.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, out)
