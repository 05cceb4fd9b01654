"""The role balancer's policy: which worker, if any, changes role now (pure: no I/O, no clock).

Two pressures, each in units of its SLO budget (1.0 = the budget is used up):

- prefill pressure = seconds of prefill backlog (prompt tokens queued on the prefill workers ÷ the
  rate those workers measured) ÷ the TTFT target. A request arriving now waits that long before its
  own prefill starts.
- decode pressure = per decode worker with streams, the larger of (measured decode step time ÷ the
  TPOT target) and (KV usage ÷ `kv_high`); the pool's pressure is the mean (the router spreads
  streams over the pool). An idle decode worker has pressure 0.

A worker moves from the cool role to the hot one when:
- the hot pressure has stayed at or above its `enter` threshold for `sustain_s` (a prefill backlog
  that shrank by a tenth over that time is draining and does not count: the capacity is there), and
- the cool role, one worker smaller, is projected (its peak pressure over the last `spare_window_s`
  x N/(N-1)) to stay below its `spare` threshold. The gap between `enter` and `spare` is the
  hysteresis that stops a switch from causing its own reversal; taking the peak rather than the
  present value keeps a bursty load's quiet moment from passing for spare capacity.
When both roles are hot no worker moves: that is the planner's (pool size) problem.

Limits, each of which makes `decide` answer "no switch" with a reason: one switch in flight at a
time; none within `settle_s` of the last one (a pool needs that long to show its new size); at
most `max_switches_per_minute`; a worker switched less than `cooldown_s` ago stays; a role keeps
`min_per_role` ready workers; a prefill worker whose pinned KV is still to be read stays; a worker
whose stats are older than `stale_after_s` counts as absent (and a role with no fresh worker blocks
any decision). Among the candidates the one with the least in-flight work moves. Only `prefill`
and `decode` workers move; `both` and `encode` workers are left alone.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

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

    @property
    def in_flight(self) -> int:
        return self.running + self.waiting + self.pinned


@dataclasses.dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float


@dataclasses.dataclass(frozen=True)
class Settings:
    prefill_enter: float = 0.5  # backlog of half the TTFT budget: move a decode worker to prefill
    prefill_spare: float = 0.25  # prefill may give up a worker if it stays below this
    decode_enter: float = 0.9
    decode_spare: float = 0.6
    kv_high: float = 0.9  # KV usage that counts as decode pressure 1.0
    sustain_s: float = 1.0  # a pressure must hold this long before it moves a worker
    cooldown_s: float = 30.0  # a switched worker stays in its new role at least this long
    settle_s: float = 1.0  # no switch this soon after the last one
    spare_window_s: float = 10.0  # a donor's pressure is judged by its peak over this long
    max_switches_per_minute: int = 2
    min_per_role: int = 1
    stale_after_s: float = 5.0

    def __post_init__(self) -> None:
        if not (0 < self.prefill_spare < self.prefill_enter and 0 < self.decode_spare < self.decode_enter):
            raise ValueError("each role's spare threshold must be positive and below its enter threshold")
        if self.max_switches_per_minute < 0 or self.min_per_role < 0:
            raise ValueError("max_switches_per_minute and min_per_role must not be negative")


@dataclasses.dataclass(frozen=True)
class Pressures:
    prefill: float  # backlog seconds ÷ TTFT target
    decode: float  # mean over decode workers of max(step ÷ TPOT target, KV usage ÷ kv_high)
    backlog_s: float
    prefill_workers: int  # ready (fresh, healthy, not switching or draining)
    decode_workers: int


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


def pressures(workers: Sequence[WorkerView], slo: Slo, settings: Settings) -> tuple[float, float, float]:
    """(prefill pressure, decode pressure, backlog seconds) of these workers."""
    prefill = [w for w in workers if w.role is Role.PREFILL]
    decode = [w for w in workers if w.role is Role.DECODE]
    queued = sum(w.queued_prefill_tokens for w in prefill)
    rate = sum(w.prefill_tokens_per_s for w in prefill)
    if queued == 0:
        backlog = 0.0
    elif rate > 0:
        backlog = queued / rate
    else:  # a queue but no measured rate yet: as hot as it gets until the first prefill is measured
        backlog = float("inf")
    per_worker = [max(w.decode_step_s / slo.tpot_s if w.running else 0.0, w.kv_usage / settings.kv_high)
                  for w in decode]
    decode_pressure = sum(per_worker) / len(per_worker) if per_worker else 0.0
    return backlog / slo.ttft_s, decode_pressure, backlog


class Balancer:
    """Decides switches from successive snapshots. It remembers only what the policy needs: since
    when each role has been hot, and the switches it decided (`record` them once started)."""

    def __init__(self, slo: Slo, settings: Settings | None = None) -> None:
        self.slo = slo
        self.settings = settings or Settings()
        self.hot_since: dict[Role, float] = {}
        self.backlog_tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)
        self.recent: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=1024)  # (t, p, d)
        self.switches: collections.deque[tuple[float, Switch]] = collections.deque(maxlen=1024)

    def record(self, switch: Switch, at: float) -> None:
        """A switch ended at `at` (the loop calls this once the worker serves in its new role, or the
        switch failed); `decide` never assumes that what it proposed was done."""
        self.switches.append((at, switch))
        self.hot_since.clear()  # the pressure has to build up again against the new split

    def _draining(self, queued: int, now: float) -> bool:
        """Whether the prefill backlog shrank by at least a tenth over the last `sustain_s`."""
        history = self.backlog_tokens
        history.append((now, queued))
        while len(history) > 1 and now - history[1][0] >= self.settings.sustain_s:
            history.popleft()
        then, before = history[0]
        return now - then >= self.settings.sustain_s and queued < 0.9 * before

    def decide(self, workers: Sequence[WorkerView], now: float) -> Decision:
        s = self.settings
        fresh = [w for w in workers if ready(w, now, s)]
        p, d, backlog = pressures(fresh, self.slo, s)
        by_role = {role: [w for w in fresh if w.role is role] for role in SWITCHABLE}
        summary = Pressures(p, d, backlog, len(by_role[Role.PREFILL]), len(by_role[Role.DECODE]))
        self.recent.append((now, p, d))
        while self.recent and now - self.recent[0][0] > s.spare_window_s:
            self.recent.popleft()
        queued = sum(w.queued_prefill_tokens for w in by_role[Role.PREFILL])
        self._track_heat(Role.PREFILL, p >= s.prefill_enter and not self._draining(queued, now), now)
        self._track_heat(Role.DECODE, d >= s.decode_enter, now)

        def hold(why: str) -> Decision:
            return Decision(None, why, summary)

        if any(w.switching for w in workers):
            return hold("a switch is in flight")
        stale = [w.worker_id for w in workers if w.healthy and now - w.seen_at > s.stale_after_s]
        if not by_role[Role.PREFILL] or not by_role[Role.DECODE]:
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
        n = len(donors)
        if from_role is Role.DECODE:
            projected, spare = max(x[2] for x in self.recent) * n / (n - 1), s.decode_spare
        else:
            projected, spare = max(x[1] for x in self.recent) * n / (n - 1), s.prefill_spare
        if projected >= spare:
            return hold(f"{to_role} is under pressure but {from_role} cannot spare a worker "
                        f"(projected pressure {projected:.2f} ≥ {spare})")
        recent = [at for at, _ in self.switches if now - at < 60.0]
        if len(recent) >= s.max_switches_per_minute:
            return hold(f"rate limit: {len(recent)} switches in the last minute")
        cooling = {sw.worker_id for at, sw in self.switches if now - at < s.cooldown_s}
        candidates = [w for w in donors if w.worker_id not in cooling and not (w.role is Role.PREFILL and w.pinned)]
        if not candidates:
            return hold(f"every {from_role} worker is cooling down or still holds KV to be read")
        chosen = min(candidates, key=lambda w: (w.in_flight, w.queued_prefill_tokens, w.worker_id))
        reason = "prefill-backlog" if to_role is Role.PREFILL else "decode-pressure"
        why = (f"prefill backlog {backlog:.2f} s is {p:.2f} of the TTFT target" if to_role is Role.PREFILL
               else f"decode pressure {d:.2f} of the TPOT target / KV limit")
        return Decision(Switch(chosen.worker_id, from_role, to_role, reason), why, summary)

    def _track_heat(self, role: Role, hot: bool, now: float) -> None:
        if hot:
            self.hot_since.setdefault(role, now)
        else:
            self.hot_since.pop(role, None)

    def _sustained(self, role: Role, now: float) -> bool:
        since = self.hot_since.get(role)
        return since is not None and now - since >= self.settings.sustain_s
