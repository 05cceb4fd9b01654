"""A worker's performance profile: what `triphase profile` measures, what `triphase plan` and the planner
predict with, and what the sim engine can replay (`--sim-profile`).

Two linear models, each fitted by least squares to the measured points, which the file keeps:
- a prefill step of n prompt tokens takes `prefill_base_s + prefill_per_token_s * n`;
- a decode step of b sequences with c context tokens in all takes
  `decode_base_s + decode_per_seq_s * b + decode_per_context_token_s * c
   + decode_per_expert_s * experts_touched(b)`.
The last term is for a mixture of experts (`moe`: experts per sparse layer, top-k), whose step reads
the weights of every expert its tokens touch: b tokens routed to k of E experts each touch, if the
router spread them evenly at random, E * (1 - (1 - k/E)^b) distinct experts per layer in expectation
— k for one sequence, all E for a large batch. Measured routing is never uniform; the fitted
coefficient absorbs that. A dense model's profile has no `moe` and the term is 0.
Coefficients are clamped at 0 (a negative cost is noise in the fit, never real). The file is JSON:
`{"version": 1, "model": ..., "engine": ..., "fit": {...}, "prefill": [[tokens, seconds], ...],
"decode": [[sequences, context_tokens, seconds], ...]}`, plus `"moe": {"experts": E, "top_k": k}` for a
mixture of experts (older files without it read as dense).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

VERSION = 1


def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Coefficients x minimising |rows·x - targets| (normal equations, Gaussian elimination with
    partial pivoting; a column that never varies gets 0)."""
    k = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    b = [sum(r[i] * t for r, t in zip(rows, targets, strict=True)) for i in range(k)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        if abs(a[col][col]) < 1e-12:
            continue
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] if abs(a[i][i]) >= 1e-12 else 0.0 for i in range(k)]


@dataclasses.dataclass(frozen=True)
class Profile:
    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_context_token_s: float = 0.0
    model: str = ""
    engine: str = ""
    prefill_points: tuple[tuple[float, float], ...] = ()
    decode_points: tuple[tuple[float, float, float], ...] = ()
    decode_per_expert_s: float = 0.0
    experts: int = 0  # experts per sparse layer (0: a dense model)
    top_k: int = 0

    def experts_touched(self, sequences: float) -> float:
        """Expected distinct experts a decode step of `sequences` touches per sparse layer (uniform routing)."""
        if not self.experts:
            return 0.0
        return self.experts * (1 - (1 - self.top_k / self.experts) ** sequences)

    def prefill_s(self, tokens: float) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def prefill_tokens_per_s(self, chunk_tokens: int = 512) -> float:
        """Prompt tokens per second of a worker kept busy with full chunks (the engine's default
        `--max-batched-tokens`); 0 for a profile with no prefill cost (unknown, not infinite)."""
        seconds = self.prefill_s(chunk_tokens)
        return chunk_tokens / seconds if seconds > 0 else 0.0

    def decode_step_s(self, sequences: float, context_tokens: float) -> float:
        return (self.decode_base_s + self.decode_per_seq_s * sequences
                + self.decode_per_context_token_s * context_tokens
                + self.decode_per_expert_s * self.experts_touched(sequences))

    @classmethod
    def fit(cls, prefill: Sequence[tuple[float, float]], decode: Sequence[tuple[float, float, float]], *,
            model: str = "", engine: str = "", experts: int = 0, top_k: int = 0) -> Profile:
        """Fit both models to measured points: (tokens, seconds) and (sequences, context, seconds);
        `experts` and `top_k` for a mixture of experts (see the module docstring)."""
        if len(prefill) < 2 or len(decode) < 3:
            raise ValueError("a profile needs at least 2 prefill and 3 decode measurements")
        _check_moe(experts, top_k)
        shape = cls(0, 0, 0, 0, experts=experts, top_k=top_k)
        p = least_squares([(1.0, n) for n, _ in prefill], [s for _, s in prefill])
        d = least_squares([(1.0, b, c, shape.experts_touched(b)) for b, c, _ in decode], [s for _, _, s in decode])
        return cls(max(0.0, p[0]), max(0.0, p[1]), max(0.0, d[0]), max(0.0, d[1]), max(0.0, d[2]), model, engine,
                   tuple((float(n), float(s)) for n, s in prefill),
                   tuple((float(b), float(c), float(s)) for b, c, s in decode),
                   max(0.0, d[3]), experts, top_k)

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "model": self.model, "engine": self.engine,
                "fit": {"prefill_base_s": self.prefill_base_s, "prefill_per_token_s": self.prefill_per_token_s,
                        "decode_base_s": self.decode_base_s, "decode_per_seq_s": self.decode_per_seq_s,
                        "decode_per_context_token_s": self.decode_per_context_token_s,
                        "decode_per_expert_s": self.decode_per_expert_s},
                **({"moe": {"experts": self.experts, "top_k": self.top_k}} if self.experts else {}),
                "prefill": [list(p) for p in self.prefill_points], "decode": [list(p) for p in self.decode_points]}

    def save(self, path: pathlib.Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: pathlib.Path) -> Profile:
        """ValueError with the file's name for anything that is not a version-1 profile."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"profile {path}: {exc.strerror}") from None
        return cls.parse(text, f"profile {path}")

    @classmethod
    def parse(cls, text: str, source: str = "profile") -> Profile:
        """The profile in `text` (a file's content, a ConfigMap's value); ValueError naming `source` for
        anything that is not a version-1 profile."""
        try:
            data = json.loads(text)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            fit = data["fit"]
            values = [float(fit[k]) for k in ("prefill_base_s", "prefill_per_token_s", "decode_base_s",
                                              "decode_per_seq_s", "decode_per_context_token_s")]
            values.append(float(fit.get("decode_per_expert_s", 0.0)))
            if any(v < 0 or v != v or v > 3600 for v in values):
                raise ValueError("coefficients must be in [0, 3600] seconds")
            moe = data.get("moe") or {}
            experts, top_k = int(moe.get("experts", 0)), int(moe.get("top_k", 0))
            _check_moe(experts, top_k)
            return cls(values[0], values[1], values[2], values[3], values[4], model=str(data.get("model", "")),
                       engine=str(data.get("engine", "")),
                       prefill_points=tuple((float(n), float(s)) for n, s in data.get("prefill", [])),
                       decode_points=tuple((float(b), float(c), float(s)) for b, c, s in data.get("decode", [])),
                       decode_per_expert_s=values[5], experts=experts, top_k=top_k)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source} is not a triphase profile: {exc}") from None


def _check_moe(experts: int, top_k: int) -> None:
    if experts == 0 and top_k == 0:
        return
    if not 1 <= experts <= 4096 or not 1 <= top_k <= experts:
        raise ValueError(f"moe needs 1 <= top_k <= experts <= 4096 (got experts {experts}, top_k {top_k})")
