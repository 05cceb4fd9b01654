"""Shared by the benchmarks (run as scripts, so benchmarks/ is sys.path[0] and they import this as `report`):
the BENCHMARKS.md section writer, timing and percentile helpers, figures."""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


def update_section(name: str, body: str, path: pathlib.Path = ROOT / "BENCHMARKS.md") -> None:
    """Write `body` between `<!-- name:begin -->` and `<!-- name:end -->` of `path` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}\n"
    text = path.read_text()
    if begin in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def best_time(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    """Best of `repeats` timed calls after one warm-up: a capability, not a mood (the 2-core VM's
    neighbours add scheduling noise)."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (from /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figure(panels: int, size: tuple[float, float]):  # type: ignore[no-untyped-def]
    """A matplotlib figure (headless) with `panels` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, axes, path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Grid on every panel, the legend on the first, tight layout, PNG."""
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
