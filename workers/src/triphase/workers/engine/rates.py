"""What a worker's steps measured: prefill throughput and decode step time, over recent steps.

The role balancer divides a prefill backlog by the prefill rate and compares decode step time with
the TPOT target, so both are measured where they happen, per step, and reported in WorkerStats.
The windows count steps, not seconds: an idle worker keeps reporting what it last measured (its
capacity), which is what the balancer needs to judge what the worker would do if it had work. The
decode window is short (8 steps): step time follows the streams a worker runs, and a long window
of slow steps lagged the balancer by tens of seconds behind a decode pool filling up.
A step that both prefills and decodes counts for both (its time is what each of its parts waited).
"""

from __future__ import annotations

import collections
import dataclasses

from triphase.workers.engine.scheduler import SchedulerOutput


def split(output: SchedulerOutput) -> tuple[int, int]:
    """(prompt tokens computed, sequences decoded) in a step: a decode computes one token of a
    request that already has computed tokens; everything else is prefill."""
    prefill = decode = 0
    for item in output.scheduled:
        if item.num_new_tokens == 1 and item.start > 0:
            decode += 1
        else:
            prefill += item.num_new_tokens
    return prefill, decode


@dataclasses.dataclass
class StepRates:
    window: int = 32  # prefill steps
    decode_window: int = 8
    prefill_tokens_total: int = 0  # since the engine started
    _prefill: collections.deque[tuple[int, float]] = dataclasses.field(init=False)
    _decode: collections.deque[float] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._prefill = collections.deque(maxlen=self.window)
        self._decode = collections.deque(maxlen=self.decode_window)

    def record(self, output: SchedulerOutput, seconds: float) -> None:
        prefill_tokens, decodes = split(output)
        self.prefill_tokens_total += prefill_tokens
        if prefill_tokens:
            self._prefill.append((prefill_tokens, seconds))
        if decodes:
            self._decode.append(seconds)

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of prefill steps; 0 before the first one."""
        seconds = sum(s for _, s in self._prefill)
        return sum(t for t, _ in self._prefill) / seconds if seconds > 0 else 0.0

    @property
    def decode_step_s(self) -> float:
        """Mean duration of decode steps; 0 before the first one."""
        return sum(self._decode) / len(self._decode) if self._decode else 0.0
