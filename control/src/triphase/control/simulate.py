"""A discrete-event model of disaggregated pools, for `triphase plan` (pure: no I/O, no clock).

Requests arrive (a Poisson process with length distributions, or a trace), are placed on the prefill
worker with the fewest queued prompt tokens, prefilled there in chunked steps, and then decoded on
the decode worker running the fewest sequences, with continuous batching. Step times come from a
`Profile` (the linear models `triphase profile` fits), as in the engine:

- a prefill step takes up to `chunk_tokens` prompt tokens from the head of the worker's queue
  (several short prompts, or part of a long one) and lasts `prefill_s(tokens)`; a prompt whose last
  chunk is in the step has its first token when the step ends (TTFT);
- a decode step runs every sequence the worker holds (up to `max_seqs`; others wait their turn) and
  lasts `decode_step_s(sequences, their context)`; each sequence gets one token per step. TPOT is
  the time from the first token to the last over the tokens after the first.

The KV hand-off between the two is not modelled (milliseconds per request on one host; add it to the
TTFT target if it matters). A request meets the SLO when its TTFT and its TPOT are both within target.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence

from triphase.common.profile import Profile


@dataclasses.dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # including the first, which the prefill produces


@dataclasses.dataclass(frozen=True)
class Lengths:
    """A length distribution: uniform in [low, high] (low == high: fixed)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 1 << 20:
            raise ValueError(f"lengths must satisfy 1 <= low <= high <= {1 << 20}, got {self.low}..{self.high}")

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


def poisson_requests(rate: float, duration_s: float, prompt: Lengths, output: Lengths, seed: int = 0) -> list[Request]:
    """Arrivals at `rate` per second over `duration_s` (the same seed gives the same requests)."""
    if rate <= 0 or duration_s <= 0:
        return []
    rng = random.Random(seed)
    requests: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return requests
        requests.append(Request(t, prompt.draw(rng), output.draw(rng)))


@dataclasses.dataclass(frozen=True)
class Outcome:
    ttft_s: float
    tpot_s: float  # 0 for a single-token output


@dataclasses.dataclass(frozen=True)
class Result:
    outcomes: tuple[Outcome, ...]
    unfinished: int  # still running when the simulation stopped (they count as missing the SLO)

    def attainment(self, ttft_s: float, tpot_s: float) -> float:
        total = len(self.outcomes) + self.unfinished
        if total == 0:
            return 1.0
        met = sum(1 for o in self.outcomes if o.ttft_s <= ttft_s and o.tpot_s <= tpot_s)
        return met / total

    def percentile(self, field: str, q: float) -> float:
        values = sorted(getattr(o, field) for o in self.outcomes)
        if not values:
            return math.nan
        return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


@dataclasses.dataclass
class _Prefill:
    queue: deque[list[int]] = dataclasses.field(default_factory=deque)  # [request index, tokens left]
    queued_tokens: int = 0
    busy: bool = False


@dataclasses.dataclass
class _Decode:
    running: list[list[int]] = dataclasses.field(default_factory=list)  # [index, context, tokens left]
    joining: list[list[int]] = dataclasses.field(default_factory=list)
    busy: bool = False


def simulate(profile: Profile, prefill_workers: int, decode_workers: int, requests: Sequence[Request], *,
             chunk_tokens: int = 512, max_seqs: int = 64, horizon_s: float | None = None) -> Result:
    """Run `requests` through the pools until all finish (or `horizon_s` of simulated time passes)."""
    if prefill_workers < 1 or decode_workers < 1:
        raise ValueError("the model needs at least one prefill and one decode worker")
    prefills = [_Prefill() for _ in range(prefill_workers)]
    decodes = [_Decode() for _ in range(decode_workers)]
    first_token = [math.nan] * len(requests)
    outcomes: dict[int, Outcome] = {}
    events: list[tuple[float, int, str, int, tuple[int, ...]]] = []
    order = itertools.count()

    def push(t: float, kind: str, worker: int, payload: tuple[int, ...] = ()) -> None:
        heapq.heappush(events, (t, next(order), kind, worker, payload))

    def start_prefill(t: float, w: int) -> None:
        worker = prefills[w]
        budget, finished = chunk_tokens, []
        for entry in worker.queue:
            if budget == 0:
                break
            n = min(budget, entry[1])
            entry[1] -= n
            budget -= n
            if entry[1] == 0:
                finished.append(entry[0])
        tokens = chunk_tokens - budget
        if tokens == 0:
            worker.busy = False
            return
        while worker.queue and worker.queue[0][1] == 0:
            worker.queue.popleft()
        worker.queued_tokens -= tokens
        worker.busy = True
        push(t + profile.prefill_s(tokens), "prefill-done", w, tuple(finished))

    def start_decode(t: float, w: int) -> None:
        worker = decodes[w]
        while worker.joining and len(worker.running) < max_seqs:
            worker.running.append(worker.joining.pop(0))
        if not worker.running:
            worker.busy = False
            return
        worker.busy = True
        context = sum(entry[1] for entry in worker.running)
        push(t + profile.decode_step_s(len(worker.running), context), "decode-done", w)

    def to_decode(t: float, index: int) -> None:
        request = requests[index]
        first_token[index] = t
        if request.output_tokens <= 1:
            outcomes[index] = Outcome(t - request.arrival_s, 0.0)
            return
        w = min(range(decode_workers), key=lambda i: (len(decodes[i].running) + len(decodes[i].joining), i))
        decodes[w].joining.append([index, request.prompt_tokens + 1, request.output_tokens - 1])

    for index, request in enumerate(requests):
        push(request.arrival_s, "arrival", index)
    while events:
        t, _, kind, who, payload = heapq.heappop(events)
        if horizon_s is not None and t > horizon_s:
            break
        if kind == "arrival":
            w = min(range(prefill_workers), key=lambda i: (prefills[i].queued_tokens, i))
            prefills[w].queue.append([who, requests[who].prompt_tokens])
            prefills[w].queued_tokens += requests[who].prompt_tokens
            if not prefills[w].busy:
                start_prefill(t, w)
        elif kind == "prefill-done":
            for index in payload:  # prompts whose last chunk was in this step
                to_decode(t, index)
            for w, worker in enumerate(decodes):  # together: those that arrive at once share a step
                if worker.joining and not worker.busy:
                    start_decode(t, w)
            start_prefill(t, who)
        else:  # decode-done
            worker = decodes[who]
            still = []
            for entry in worker.running:
                entry[1] += 1
                entry[2] -= 1
                if entry[2] == 0:
                    request = requests[entry[0]]
                    outcomes[entry[0]] = Outcome(first_token[entry[0]] - request.arrival_s,
                                                 (t - first_token[entry[0]]) / (request.output_tokens - 1))
                else:
                    still.append(entry)
            worker.running = still
            start_decode(t, who)
    return Result(tuple(outcomes[i] for i in sorted(outcomes)), len(requests) - len(outcomes))
