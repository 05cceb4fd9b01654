"""Why batch-1 decode stops where it does: the weight-streaming rate of each matmul kernel torch
offers on this CPU, against a plain memcpy, for the shapes of one SmolLM2-135M decode step.

    python benchmarks/kernels.py        # writes the "Kernels" section of BENCHMARKS.md

Each kernel multiplies 1 (or 8) activation rows by the 30 layers' fused matrices (qkv, o, gate|up,
down) once, best of 5; GB/s = bytes of weights read / time. The memcpy row counts bytes read +
written, as the engine benchmark's bound does.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from report import best_time, update_section

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30  # (out, in) per layer


def memcpy_rate() -> float:
    src = torch.ones(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / best_time(lambda: dst.copy_(src))


def main() -> None:
    from triphase.workers.models.quant import Int4Linear, Q4Blocks

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dense = [torch.randn(o, i) * 0.05 for o, i in SHAPES]
    elements = sum(w.numel() for w in dense)
    rows: list[tuple[str, int, float]] = []
    rows.append(("memcpy 1 GiB (read + write)", 0, memcpy_rate()))
    for batch in (1, 8):
        for name, dtype, layout in [
            ("float32 F.linear, W [out, in]", torch.float32, "linear"),
            ("float32 x @ W, W [in, out] (triphase)", torch.float32, "t"),
            ("bfloat16 x @ W, W [in, out]", torch.bfloat16, "t"),
            ("bfloat16 F.linear, W [out, in] (triphase)", torch.bfloat16, "linear"),
            ("float16 F.linear", torch.float16, "linear"),
        ]:
            ws = [w.to(dtype) if layout == "linear" else w.t().contiguous().to(dtype) for w in dense]
            x = torch.randn(batch, 576).to(dtype)
            xs = {i: torch.randn(batch, i).to(dtype) for i in (576, 1536)}

            def run(ws=ws, layout=layout, xs=xs) -> None:
                for w in ws:
                    if layout == "linear":
                        F.linear(xs[w.shape[1]], w)
                    else:
                        xs[w.shape[0]] @ w

            del x
            rows.append((name, batch, elements * ws[0].element_size() / best_time(run)))
            sys.stderr.write(f"[kernels] {name} b={batch}: {rows[-1][2] / 1e9:.1f} GB/s\n")
        packs = [Int4Linear(Q4Blocks(rng.integers(0, 16, (o, i), dtype=np.uint8),
                                     np.full((o, i // 32), 0.01, np.float32), np.zeros((o, i // 32), np.float32)))
                 for o, i in SHAPES]
        xs16 = {i: torch.randn(batch, i).bfloat16() for i in (576, 1536)}
        nbytes = sum(p.nbytes for p in packs)
        def run_int4(packs=packs, xs16=xs16) -> None:
            for pack, (_, cols) in zip(packs, SHAPES, strict=True):
                pack(xs16[cols])

        rows.append(("int4 packed, bf16 x (triphase int4)", batch, nbytes / best_time(run_int4)))
        sys.stderr.write(f"[kernels] int4 b={batch}: {rows[-1][2] / 1e9:.1f} GB/s\n")
    memcpy = rows[0][2]
    lines = ["## Kernels: how fast each matmul streams weights (batch-1 decode ceiling)", "",
             f"`python benchmarks/kernels.py` ({time.strftime('%Y-%m-%d')}, {torch.get_num_threads()} threads): one "
             "decode step's 120 matrices, best of 5. A batch-1 step can go no faster than its kernel streams "
             "weights, so the kernel's share of memcpy bandwidth caps the engine's share of the bound. "
             f"torch {torch.__version__}.", "",
             "| kernel | rows | GB/s of weights | vs memcpy |", "| --- | ---: | ---: | ---: |"]
    for name, batch, rate in rows:
        lines.append(f"| {name} | {batch or '-'} | {rate / 1e9:.1f} | {100 * rate / memcpy:.0f} % |")
    section = "\n".join(lines) + "\n"
    sys.stdout.write(section)
    update_section("kernels", section)


if __name__ == "__main__":
    main()
