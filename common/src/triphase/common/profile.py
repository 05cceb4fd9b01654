"""A worker's performance profile: what `triphase profile` measures, what `triphase plan` and the planner
predict with, and what the sim engine can replay (`--sim-profile`).

Two linear models, each fitted by least squares to the measured points, which the file keeps:
- a prefill step of n prompt tokens takes `prefill_base_s + prefill_per_token_s * n`;
- a decode step of b sequences with c context tokens in all takes
  `decode_base_s + decode_per_seq_s * b + decode_per_context_token_s * c`.
Coefficients are clamped at 0 (a negative cost is noise in the fit, never real). The file is JSON:
`{"version": 1, "model": ..., "engine": ..., "fit": {...}, "prefill": [[tokens, seconds], ...],
"decode": [[sequences, context_tokens, seconds], ...]}`.
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

    def prefill_s(self, tokens: float) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens

    def prefill_tokens_per_s(self, chunk_tokens: int = 512) -> float:
        """Prompt tokens per second of a worker kept busy with full chunks (the engine's default
        `--max-batched-tokens`); 0 for a profile with no prefill cost (unknown, not infinite)."""
        seconds = self.prefill_s(chunk_tokens)
        return chunk_tokens / seconds if seconds > 0 else 0.0

    def decode_step_s(self, sequences: float, context_tokens: float) -> float:
        return self.decode_base_s + self.decode_per_seq_s * sequences + self.decode_per_context_token_s * context_tokens

    @classmethod
    def fit(cls, prefill: Sequence[tuple[float, float]], decode: Sequence[tuple[float, float, float]], *,
            model: str = "", engine: str = "") -> Profile:
        """Fit both models to measured points: (tokens, seconds) and (sequences, context, seconds)."""
        if len(prefill) < 2 or len(decode) < 3:
            raise ValueError("a profile needs at least 2 prefill and 3 decode measurements")
        p = least_squares([(1.0, n) for n, _ in prefill], [s for _, s in prefill])
        d = least_squares([(1.0, b, c) for b, c, _ in decode], [s for _, _, s in decode])
        return cls(max(0.0, p[0]), max(0.0, p[1]), max(0.0, d[0]), max(0.0, d[1]), max(0.0, d[2]), model, engine,
                   tuple((float(n), float(s)) for n, s in prefill),
                   tuple((float(b), float(c), float(s)) for b, c, s in decode))

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "model": self.model, "engine": self.engine,
                "fit": {"prefill_base_s": self.prefill_base_s, "prefill_per_token_s": self.prefill_per_token_s,
                        "decode_base_s": self.decode_base_s, "decode_per_seq_s": self.decode_per_seq_s,
                        "decode_per_context_token_s": self.decode_per_context_token_s},
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
            if any(v < 0 or v != v or v > 3600 for v in values):
                raise ValueError("coefficients must be in [0, 3600] seconds")
            return cls(values[0], values[1], values[2], values[3], values[4], model=str(data.get("model", "")),
                       engine=str(data.get("engine", "")),
                       prefill_points=tuple((float(n), float(s)) for n, s in data.get("prefill", [])),
                       decode_points=tuple((float(b), float(c), float(s)) for b, c, s in data.get("decode", [])))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source} is not a triphase profile: {exc}") from None
