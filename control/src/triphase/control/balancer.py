"""The role balancer's policy: which worker, if any, changes role now (pure: no I/O, no clock).

Each role's demand is measured in workers' worth of capacity at its SLO, and its load is that
demand over the role's ready workers (1.0 = the pool is exactly full):

- prefill demand = (prompt tokens arriving per second + the backlog beyond what the TTFT budget
  tolerates, to be cleared within `drain` TTFT targets) ÷ one prefill worker's measured rate. Arrivals come
  from the workers' counters (queued + computed prompt tokens) over `rate_window_s`, so demand is
  seen as it arrives, before a backlog has built up; the backlog term sizes the pool to clear what
  built up anyway. A backlog that the pool is clearing fast enough adds nothing.
- decode demand = the sum over decode workers of max(measured step time ÷ the TPOT target,
  KV usage ÷ `kv_high`); an idle decode worker adds 0 (streams go to it as soon as it exists).
  Step times lag a rise in load (a stream slows every step only once it runs), so while the
  streams on the decode pool grow, the streams expected over the next `decode_lead_s` at the rate
  of the last `growth_window_s` are added, each at the pool's current step time per stream.

A worker moves from the cool role to the hot one when:
- the hot role's load has stayed at or above its `enter` threshold for `sustain_s`, and
- the donor role, one worker smaller, stays cool enough: its peak demand over the last
  `spare_window_s` ÷ (its workers - 1) is below its `spare` threshold, or the move lowers the
  higher of the two loads by at least `margin` (the hot role is the worse off by far: a worker
  serves the SLOs better there). The gaps between `enter`, `spare` and `margin` are the
  hysteresis that keeps a switch from causing its own reversal; judging the donor by its recent
  peak keeps a bursty load's quiet moment from passing for spare capacity.
While the hot role stays hot, the next worker follows after `settle_s` (a step in load is met by
as many switches as it needs, one at a time). When both roles are hot no worker moves: that is
the planner's (pool size) problem.

Limits, each of which makes `decide` answer "no switch" with a reason: one switch in flight at a
time; none within `settle_s` of the last one; at most `max_switches_per_minute`; a worker
switched less than `cooldown_s` ago stays; a role keeps `min_per_role` ready workers; a prefill
worker whose pinned KV is still to be read stays; a worker whose stats are older than
`stale_after_s` counts as absent (and a role with no fresh worker blocks any decision). Among the
candidates the one with the least in-flight work moves. Only `prefill` and `decode` workers move;
`both` and `encode` workers are left alone.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import TypeVar

from triphase.common.roles import Role

SWITCHABLE = (Role.PREFILL, Role.DECODE)


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """One worker as its last stats report showed it."""

    worker_id: str
    role: Role
    seen_at: float  # when the report arrived (the caller's clock, seconds)
    healthy: bool = True
    switching: bool = False
    draining: bool = False
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0  # share of KV blocks in use, 0..1
    pinned: int = 0  # prefilled requests whose KV a decode worker has still to read
    prefill_tokens_per_s: float = 0.0  # measured over its recent prefill steps; 0 = not measured yet
    decode_step_s: float = 0.0  # mean of its recent decode steps; 0 = not measured yet
    prefill_tokens_total: int = 0  # prompt tokens computed since the worker started

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting + self.pinned


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclasses.dataclass(frozen=True)
class Settings:
    # A prefill pool below full keeps its queue short; a backlog it cannot clear in time is demand too.
    prefill_enter: float = 1.0  # prefill load (demand ÷ workers) that moves a decode worker to prefill
    prefill_spare: float = 0.75  # prefill may give up a worker if its load stays below this
    decode_enter: float = 0.9
    decode_spare: float = 0.6
    margin: float = 0.1  # ... or if the move lowers the higher of the two loads by this much
    backlog_ok: float = 0.5  # share of the TTFT target a prefill backlog may take before it adds demand
    drain: float = 1.0  # a backlog beyond that is to be cleared within this many TTFT targets
    rate_window_s: float = 10.0  # arrivals of prompt tokens are measured over this long
    decode_lead_s: float = 2.0  # decode demand counts the streams expected this far ahead ...
    growth_window_s: float = 2.0  # ... at their growth rate over this long (0: off)
    kv_high: float = 0.9  # KV usage that counts as decode pressure 1.0
    sustain_s: float = 1.0  # a load must hold this long before it moves a worker
    cooldown_s: float = 30.0  # a switched worker stays in its new role at least this long
    settle_s: float = 1.0  # no switch this soon after the last one
    spare_window_s: float = 5.0  # a donor's demand is judged by its peak over this long
    max_switches_per_minute: int = 2
    min_per_role: int = 1
    stale_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not (0 < self.prefill_spare < self.prefill_enter and 0 < self.decode_spare < self.decode_enter):
            raise ValueError("each role's spare threshold must be positive and below its enter threshold")
        if self.max_switches_per_minute < 0 or self.min_per_role < 0:
            raise ValueError("max_switches_per_minute and min_per_role must not be negative")
        if min(self.margin, self.drain, self.rate_window_s) <= 0:
            raise ValueError("margin, drain and rate_window_s must be positive")


@dataclasses.dataclass(frozen=True)
class Pressures:
    prefill: float  # prefill load: demand ÷ ready prefill workers (1 = the pool is full)
    decode: float  # decode load: demand ÷ ready decode workers
    backlog_s: float  # queued prompt tokens ÷ the prefill pool's measured rate
    prefill_workers: int  # ready (fresh, healthy, not switching or draining)
    decode_workers: int
    prefill_demand: float = 0.0  # in workers
    decode_demand: float = 0.0
    arrivals: float = 0.0  # prompt tokens per second arriving at the workers


@dataclasses.dataclass(frozen=True)
class Switch:
    worker_id: str
    from_role: Role
    to_role: Role
    reason: str  # "prefill-backlog" or "decode-pressure"


@dataclasses.dataclass(frozen=True)
class Decision:
    switch: Switch | None
    why: str  # for a switch, what drove it; otherwise what held the balancer back
    pressures: Pressures | None = None


def ready(worker: WorkerView, now: float, settings: Settings) -> bool:
    return (worker.healthy and not worker.switching and not worker.draining
            and now - worker.seen_at <= settings.stale_after_s)


def demands(workers: Sequence[WorkerView], arrivals: float, slo: Slo, settings: Settings,
            ) -> tuple[float, float, float]:
    """(prefill demand, decode demand, backlog seconds) of these (ready) workers; demands in workers."""
    prefill = [w for w in workers if w.role is Role.PREFILL]
    decode = [w for w in workers if w.role is Role.DECODE]
    queued = sum(w.queued_prefill_tokens for w in prefill)
    rates = [w.prefill_tokens_per_s for w in prefill if w.prefill_tokens_per_s > 0]
    if not rates:  # no prefill measured yet: a queue is as hot as it gets, none is no demand
        inf = float("inf")
        prefill_demand, backlog = (inf, inf) if queued or arrivals else (0.0, 0.0)
    else:
        per_worker = sum(rates) / len(rates)
        backlog = queued / (per_worker * len(prefill))
        tolerated = settings.backlog_ok * slo.ttft_s * per_worker * len(prefill)
        prefill_demand = (arrivals + max(0.0, queued - tolerated) / (settings.drain * slo.ttft_s)) / per_worker
    decode_demand = sum(max(w.decode_step_s / slo.tpot_s if w.running else 0.0, w.kv_usage / settings.kv_high)
                        for w in decode)
    return prefill_demand, decode_demand, backlog


T = TypeVar("T")


def _window_start(history: collections.deque[tuple[float, T]], now: float, current: T,
                  window_s: float) -> tuple[float, T]:
    """Record `current` at `now` and return the snapshot the window starts from: the newest that is at
    least `window_s` old (or the oldest kept, while the history is shorter)."""
    history.append((now, current))
    while len(history) > 2 and now - history[1][0] >= window_s:
        history.popleft()
    return history[0]


class Balancer:
    """Decides switches from successive snapshots. It remembers only what the policy needs: the
    recent prompt-token counters (for the arrival rate), the recent demands (for the donor's
    peak), since when each role has been hot, and the switches it decided (`record` them once done)."""

    def __init__(self, slo: Slo, settings: Settings | None = None) -> None:
        self.slo = slo
        self.settings = settings or Settings()
        self.hot_since: dict[Role, float] = {}
        self.counters: collections.deque[tuple[float, dict[str, tuple[int, int]]]] = collections.deque(maxlen=1024)
        self.recent: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=1024)  # (t, p, d)
        self.switches: collections.deque[tuple[float, Switch]] = collections.deque(maxlen=1024)
        self.streams: collections.deque[tuple[float, dict[str, int]]] = collections.deque(maxlen=1024)

    def record(self, switch: Switch, at: float) -> None:
        """A switch ended at `at` (the loop calls this once the worker serves in its new role, or the
        switch failed); `decide` never assumes that what it proposed was done."""
        self.switches.append((at, switch))

    def arrivals(self, workers: Sequence[WorkerView], now: float) -> float:
        """Prompt tokens per second that reached the workers over the last `rate_window_s`: the growth
        of each worker's queued + computed prompt tokens (work handed from one worker to another
        leaves one and reaches the other, so it cancels out; a restarted worker is left out)."""
        current = {w.worker_id: (w.queued_prefill_tokens, w.prefill_tokens_total)
                   for w in workers if w.role in SWITCHABLE and w.healthy}
        then, before = _window_start(self.counters, now, current, self.settings.rate_window_s)
        if now - then <= 0:
            return 0.0
        grown = sum(sum(current[k]) - sum(before[k]) for k in current.keys() & before.keys()
                    if current[k][1] >= before[k][1])
        return max(0.0, grown / (now - then))

    def stream_growth(self, decode: Sequence[WorkerView], now: float) -> float:
        """Streams per second by which the decode workers' running + waiting grew over the last
        `growth_window_s` (workers present at both ends; 0 when they shrank)."""
        current = {w.worker_id: w.running + w.waiting for w in decode}
        then, before = _window_start(self.streams, now, current, self.settings.growth_window_s)
        if now - then <= 0:
            return 0.0
        grown = sum(current[k] - before[k] for k in current.keys() & before.keys())
        return max(0.0, grown / (now - then))

    def expected_decode(self, decode: Sequence[WorkerView], now: float) -> float:
        """Decode demand (in workers) of the streams expected over the next `decode_lead_s`."""
        growth = self.stream_growth(decode, now)
        busy = [w for w in decode if w.running and w.decode_step_s > 0]
        if not growth or not busy or not self.settings.growth_window_s:
            return 0.0
        per_stream = sum(w.decode_step_s / w.running for w in busy) / len(busy)
        return growth * self.settings.decode_lead_s * per_stream / self.slo.tpot_s

    def decide(self, workers: Sequence[WorkerView], now: float) -> Decision:
        s = self.settings
        arrivals = self.arrivals(workers, now)
        fresh = [w for w in workers if ready(w, now, s)]
        need_p, need_d, backlog = demands(fresh, arrivals, self.slo, s)
        need_d += self.expected_decode([w for w in fresh if w.role is Role.DECODE], now)
        by_role = {role: [w for w in fresh if w.role is role] for role in SWITCHABLE}
        n = {role: len(by_role[role]) for role in SWITCHABLE}
        need = {Role.PREFILL: need_p, Role.DECODE: need_d}
        load = {role: need[role] / n[role] if n[role] else float("inf") if need[role] else 0.0
                for role in SWITCHABLE}
        summary = Pressures(load[Role.PREFILL], load[Role.DECODE], backlog, n[Role.PREFILL], n[Role.DECODE],
                            need_p, need_d, arrivals)
        self.recent.append((now, need_p, need_d))
        while self.recent and now - self.recent[0][0] > s.spare_window_s:
            self.recent.popleft()
        enter = {Role.PREFILL: s.prefill_enter, Role.DECODE: s.decode_enter}
        for role in SWITCHABLE:
            self._track_heat(role, load[role] >= enter[role], now)

        def hold(why: str) -> Decision:
            return Decision(None, why, summary)

        if any(w.switching for w in workers):
            return hold("a switch is in flight")
        stale = [w.worker_id for w in workers if w.healthy and now - w.seen_at > s.stale_after_s]
        if not n[Role.PREFILL] or not n[Role.DECODE]:
            return hold("a role has no ready worker" + (f" (stale stats: {', '.join(stale)})" if stale else ""))
        if self.switches and now - self.switches[-1][0] < s.settle_s:
            return hold("the last switch is still settling")
        hot = [role for role in SWITCHABLE if self._sustained(role, now)]
        if not hot:
            return hold("no role is under sustained pressure")
        if len(hot) == 2:
            return hold("both roles are under pressure: more workers are needed, not a different split")
        to_role = hot[0]
        from_role = Role.DECODE if to_role is Role.PREFILL else Role.PREFILL
        donors = by_role[from_role]
        if len(donors) <= s.min_per_role:
            return hold(f"{from_role} is at its minimum of {s.min_per_role} workers")
        column = 1 if from_role is Role.PREFILL else 2
        donor_after = max(x[column] for x in self.recent) / (len(donors) - 1)
        spare = s.prefill_spare if from_role is Role.PREFILL else s.decode_spare
        receiver_after = need[to_role] / (n[to_role] + 1)
        if donor_after >= spare and max(donor_after, receiver_after) > load[to_role] - s.margin:
            return hold(f"{to_role} is under pressure but {from_role} cannot spare a worker "
                        f"(its load would be {donor_after:.2f}, {to_role}'s {receiver_after:.2f})")
        recent = [at for at, _ in self.switches if now - at < 60.0]
        if len(recent) >= s.max_switches_per_minute:
            return hold(f"rate limit: {len(recent)} switches in the last minute")
        cooling = {sw.worker_id for at, sw in self.switches if now - at < s.cooldown_s}
        candidates = [w for w in donors if w.worker_id not in cooling and not (w.role is Role.PREFILL and w.pinned)]
        if not candidates:
            return hold(f"every {from_role} worker is cooling down or still holds KV to be read")
        chosen = min(candidates, key=lambda w: (w.in_flight, w.queued_prefill_tokens, w.worker_id))
        reason = "prefill-backlog" if to_role is Role.PREFILL else "decode-pressure"
        why = (f"prefill load {load[to_role]:.2f} ({arrivals:.0f} prompt tokens/s arriving, backlog {backlog:.2f} s)"
               if to_role is Role.PREFILL else f"decode load {load[to_role]:.2f} of the TPOT target / KV limit")
        return Decision(Switch(chosen.worker_id, from_role, to_role, reason), why, summary)

    def _track_heat(self, role: Role, hot: bool, now: float) -> None:
        if hot:
            self.hot_since.setdefault(role, now)
        else:
            self.hot_since.pop(role, None)

    def _sustained(self, role: Role, now: float) -> bool:
        since = self.hot_since.get(role)
        return since is not None and now - since >= self.settings.sustain_s
