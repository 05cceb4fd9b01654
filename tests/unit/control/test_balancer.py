"""The role balancer's policy, table-driven: snapshots in, at most one switch out.

The scenario tests drive the policy with a small fluid model of a cluster (prefill backlog grows
with prompt demand above the prefill pool's rate; decode step time grows with streams per decode
worker), apply each switch it decides after a fixed switch time, and count switches and reversals.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from triphase.common.roles import Role
from triphase.control.balancer import Balancer, Settings, Slo, Switch, WorkerView

SLO = Slo(ttft_s=2.0, tpot_s=0.1)
P, D = Role.PREFILL, Role.DECODE


def w(worker_id: str, role: Role, **kw: object) -> WorkerView:
    defaults: dict[str, object] = {"seen_at": 0.0, "prefill_tokens_per_s": 1000.0, "decode_step_s": 0.02}
    defaults.update(kw)
    return WorkerView(worker_id, role, **defaults)  # type: ignore[arg-type]


def decide_after_sustain(balancer: Balancer, workers: list[WorkerView], start: float = 0.0):  # type: ignore[no-untyped-def]
    """Show the same snapshot twice, `sustain_s` apart (a pressure must hold before it acts)."""
    balancer.decide([dataclasses.replace(x, seen_at=start) for x in workers], start)
    later = start + balancer.settings.sustain_s
    return balancer.decide([dataclasses.replace(x, seen_at=later) for x in workers], later)


# 3000 tokens at 1000 tok/s: a 1.5 s backlog, 0.5 s beyond the half of the TTFT target it may take; clearing
# that within one TTFT target (2 s) takes a worker's worth: prefill demand 1.0 (with no new arrivals).
BACKLOG = {"queued_prefill_tokens": 3000}
SLOW_DECODE = {"running": 8, "decode_step_s": 0.12}  # 1.2 of the TPOT target


@pytest.mark.parametrize(("workers", "expected", "why"), [
    # A prefill backlog moves the idlest decode worker.
    ([w("p0", P, **BACKLOG), w("d0", D, running=3), w("d1", D, running=1), w("d2", D, running=2)],
     Switch("d1", D, P, "prefill-backlog"), "prefill load"),
    # Slow decode steps move the prefill worker with the least in flight.
    ([w("p0", P, running=1), w("p1", P), w("d0", D, **SLOW_DECODE)],
     Switch("p1", P, D, "decode-pressure"), "decode load"),
    # A full KV cache is decode pressure too, even with fast steps.
    ([w("p0", P), w("p1", P), w("d0", D, running=4, kv_usage=0.95)],
     Switch("p0", P, D, "decode-pressure"), "decode load"),
    # No pressure: nothing moves.
    ([w("p0", P, queued_prefill_tokens=100), w("d0", D, running=2), w("d1", D)], None, "no role is under"),
    # Both hot: the planner's problem.
    ([w("p0", P, **BACKLOG), w("p1", P, **BACKLOG), w("d0", D, **SLOW_DECODE), w("d1", D, **SLOW_DECODE)],
     None, "both roles"),
    # min_per_role (1): the only decode worker stays.
    ([w("p0", P, **BACKLOG), w("d0", D)], None, "minimum"),
    # The donor, one worker smaller, would be hotter than the receiver is now: no switch.
    ([w("p0", P, **BACKLOG), w("d0", D, running=8, decode_step_s=0.06), w("d1", D, running=8, decode_step_s=0.06)],
     None, "cannot spare"),
    # ... but one that ends up above its spare threshold and still well below the receiver may give.
    ([w("p0", P, **BACKLOG), w("d0", D, running=8, decode_step_s=0.04), w("d1", D, running=8, decode_step_s=0.04)],
     Switch("d0", D, P, "prefill-backlog"), "prefill load"),
    # A prefill worker whose KV is still to be read stays; the other one moves.
    ([w("p0", P, pinned=2), w("p1", P, running=1), w("d0", D, **SLOW_DECODE)],
     Switch("p1", P, D, "decode-pressure"), "decode load"),
    ([w("p0", P, pinned=2), w("p1", P, pinned=1), w("d0", D, **SLOW_DECODE)], None, "KV to be read"),
    # A switch in flight blocks another.
    ([w("p0", P, **BACKLOG), w("d0", D), w("d1", D, switching=True), w("d2", D)], None, "in flight"),
    # A queue but no measured rate yet is as hot as it gets.
    ([w("p0", P, queued_prefill_tokens=10, prefill_tokens_per_s=0.0), w("d0", D), w("d1", D)],
     Switch("d0", D, P, "prefill-backlog"), "prefill load"),
    # `both` and `encode` workers never move and count for neither role.
    ([w("b0", Role.BOTH), w("e0", Role.ENCODE), w("p0", P, **BACKLOG), w("d0", D)], None, "minimum"),
])
def test_one_snapshot(workers: list[WorkerView], expected: Switch | None, why: str) -> None:
    decision = decide_after_sustain(Balancer(SLO), workers)
    assert decision.switch == expected
    assert why in decision.why


def test_a_burst_shorter_than_sustain_moves_nothing() -> None:
    balancer = Balancer(SLO, Settings(sustain_s=2.0))
    hot = [w("p0", P, **BACKLOG), w("d0", D), w("d1", D)]
    calm = [w("p0", P), w("d0", D), w("d1", D)]
    for t, workers in [(0.0, hot), (1.0, hot), (1.5, calm), (2.5, hot), (4.0, hot)]:
        decision = balancer.decide([dataclasses.replace(x, seen_at=t) for x in workers], t)
        assert decision.switch is None, t
    decision = balancer.decide([dataclasses.replace(x, seen_at=4.5) for x in hot], 4.5)
    assert decision.switch == Switch("d0", D, P, "prefill-backlog")


def test_a_draining_backlog_moves_nothing() -> None:
    balancer = Balancer(SLO)
    workers = [w("p0", P, queued_prefill_tokens=3000), w("d0", D), w("d1", D)]
    shrunk = [w("p0", P, queued_prefill_tokens=2600), w("d0", D), w("d1", D)]
    balancer.decide(workers, 0.0)
    decision = balancer.decide([dataclasses.replace(x, seen_at=1.0) for x in shrunk], 1.0)
    assert decision.switch is None and decision.pressures is not None and decision.pressures.prefill >= 0.5
    # Growing again (from 2600): hot from now on, and acted on once that holds for sustain_s.
    balancer.decide([dataclasses.replace(x, seen_at=1.5) for x in workers], 1.5)
    assert balancer.decide([dataclasses.replace(x, seen_at=2.5) for x in workers], 2.5).switch is not None


def test_no_switch_while_the_last_one_settles() -> None:
    balancer = Balancer(SLO, Settings(settle_s=5.0, max_switches_per_minute=10))
    workers = [w("p0", P, **BACKLOG), w("d0", D), w("d1", D), w("d2", D)]
    balancer.record(Switch("d3", D, P, "prefill-backlog"), 0.0)
    assert "settling" in decide_after_sustain(balancer, workers, start=2.0).why
    assert decide_after_sustain(balancer, workers, start=5.0).switch is not None


def test_stale_stats_count_as_absent() -> None:
    balancer = Balancer(SLO)
    workers = [w("p0", P, **BACKLOG), w("d0", D), w("d1", D)]
    balancer.decide(workers, 0.0)
    # d0 and d1 last reported 6 s ago: the decode role has no fresh worker, nothing is decided.
    old = [dataclasses.replace(workers[0], seen_at=6.0), workers[1], workers[2]]
    decision = balancer.decide(old, 6.0)
    assert decision.switch is None and "stale stats: d0, d1" in decision.why
    # One of them reports again: still only one fresh decode worker, which min_per_role keeps.
    decision = balancer.decide([old[0], dataclasses.replace(workers[1], seen_at=6.0), workers[2]], 6.0)
    assert decision.switch is None and "minimum" in decision.why


def test_unhealthy_and_draining_workers_are_not_counted() -> None:
    workers = [w("p0", P, **BACKLOG), w("d0", D, draining=True), w("d1", D), w("d2", D, healthy=False)]
    assert "minimum" in decide_after_sustain(Balancer(SLO), workers).why


def test_rate_limit_and_cooldown() -> None:
    balancer = Balancer(SLO, Settings(max_switches_per_minute=1, cooldown_s=90))
    workers = [w("p0", P, **BACKLOG), w("d0", D), w("d1", D), w("d2", D)]
    first = decide_after_sustain(balancer, workers)
    assert first.switch is not None
    balancer.record(first.switch, 1.0)
    assert "rate limit" in decide_after_sustain(balancer, workers, start=30.0).why
    # A minute later the rate allows another, but the worker switched is cooling down and the
    # same worker, if it were back in decode, would not be picked: another decode worker is.
    assert decide_after_sustain(balancer, workers, start=61.0).switch == Switch("d1", D, P, "prefill-backlog")
    back = [w("p0", P), w("p1", P), w("d0", P), w("d1", D, **SLOW_DECODE)]
    balancer.record(Switch("d1", D, P, "prefill-backlog"), 62.5)
    # 62.5 + 60: the rate allows one; d0 (switched at 1.0) may move again, p1 has its cooldown too.
    decision = decide_after_sustain(balancer, back, start=122.6)
    assert decision.switch == Switch("d0", P, D, "decode-pressure")


def test_zero_switches_per_minute_never_switches() -> None:
    balancer = Balancer(SLO, Settings(max_switches_per_minute=0))
    assert "rate limit" in decide_after_sustain(balancer, [w("p0", P, **BACKLOG), w("d0", D), w("d1", D)]).why


@pytest.mark.parametrize("bad", [{"prefill_spare": 1.05}, {"decode_spare": 0.0}, {"min_per_role": -1}, {"drain": 0.0}])
def test_settings_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Settings(**bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- scenarios
@dataclasses.dataclass
class Cluster:
    """Fluid model: per worker prefill 1000 tok/s; decode step = 10 ms + 10 ms per stream."""

    roles: dict[str, Role]
    backlog: float = 0.0  # prompt tokens queued over the prefill pool
    switching: dict[str, float] = dataclasses.field(default_factory=dict)  # worker -> done at
    computed: dict[str, float] = dataclasses.field(default_factory=dict)  # prompt tokens per worker
    switch_s: float = 1.0

    def views(self, streams: float, now: float) -> list[WorkerView]:
        prefill = [i for i, r in self.roles.items() if r is P and i not in self.switching]
        decode = [i for i, r in self.roles.items() if r is D and i not in self.switching]
        per_decode = streams / max(len(decode), 1)
        out = []
        for worker_id, role in sorted(self.roles.items()):
            total = int(self.computed.get(worker_id, 0.0))
            if role is P:
                queued = int(self.backlog / len(prefill)) if worker_id in prefill else 0
                out.append(WorkerView(worker_id, role, now, switching=worker_id in self.switching,
                                      queued_prefill_tokens=queued, prefill_tokens_per_s=1000.0,
                                      prefill_tokens_total=total))
            else:
                out.append(WorkerView(worker_id, role, now, switching=worker_id in self.switching,
                                      running=round(per_decode), decode_step_s=0.01 + 0.01 * per_decode,
                                      prefill_tokens_total=total))
        return out

    def advance(self, prompt_tokens_per_s: float, dt: float, now: float) -> None:
        for worker_id, done in list(self.switching.items()):
            if now >= done:
                del self.switching[worker_id]
        prefill = [i for i, r in self.roles.items() if r is P and i not in self.switching]
        work = self.backlog + prompt_tokens_per_s * dt
        done = min(work, 1000.0 * len(prefill) * dt)
        for worker_id in prefill:
            self.computed[worker_id] = self.computed.get(worker_id, 0.0) + done / len(prefill)
        self.backlog = work - done


def run(load: list[tuple[float, float, float]], workers: int = 8, settings: Settings | None = None,
        ) -> tuple[list[tuple[float, Switch]], Cluster]:
    """`load`: (until, prompt tokens/s, decode streams) segments; 0.5 s ticks."""
    cluster = Cluster({f"w{i}": P if i < workers // 2 else D for i in range(workers)})
    balancer = Balancer(SLO, settings or Settings(cooldown_s=30, max_switches_per_minute=4))
    switches: list[tuple[float, Switch]] = []
    now, dt = 0.0, 0.5
    for until, demand, streams in load:
        while now < until:
            decision = balancer.decide(cluster.views(streams, now), now)
            if decision.switch is not None:
                sw = decision.switch
                balancer.record(sw, now)
                switches.append((now, sw))
                cluster.roles[sw.worker_id] = sw.to_role
                cluster.switching[sw.worker_id] = now + cluster.switch_s
            cluster.advance(demand, dt, now)
            now += dt
    return switches, cluster


def reversals(switches: list[tuple[float, Switch]]) -> int:
    return sum(1 for (_, a), (_, b) in itertools.pairwise(switches) if a.to_role != b.to_role)


def test_a_step_to_prompt_heavy_load_moves_decode_workers_to_prefill_quickly() -> None:
    # 4 prefill workers (4000 tok/s) face 5500 tok/s; 4 decode streams need only two decode workers.
    switches, cluster = run([(20, 2000, 4), (120, 5500, 4)])
    assert switches and switches[0][0] - 20 <= 10, switches
    assert all(sw.to_role is P for _, sw in switches)
    # 6 prefill workers would carry 5500 tok/s, but not clear the backlog built while reacting in time: 7.
    assert sum(1 for r in cluster.roles.values() if r is P) == 7
    assert cluster.backlog == 0  # the backlog built while reacting is gone
    assert switches[-1][0] - switches[0][0] <= 3 * (1.0 + 1.0 + 0.5)  # one after the other: switch + settle


def test_a_step_to_decode_heavy_load_moves_prefill_workers_to_decode() -> None:
    # 40 streams on 4 decode workers: 10 ms + 100 ms per step, over the 100 ms TPOT target.
    switches, cluster = run([(20, 500, 8), (120, 500, 40)])
    assert switches and all(sw.to_role is D for _, sw in switches)
    assert switches[0][0] - 20 <= 10
    decode = sum(1 for r in cluster.roles.values() if r is D)
    assert 0.01 + 0.01 * 40 / decode < SLO.tpot_s * 0.9


def test_a_slow_ramp_moves_workers_one_at_a_time_without_reversals() -> None:
    load = [(t + 10, 4000 + 200 * t / 10, 4) for t in range(0, 300, 10)]  # 4000 -> 9800 tok/s over 5 min
    switches, cluster = run(load, workers=12)
    assert len(switches) >= 3 and reversals(switches) == 0
    assert sum(1 for r in cluster.roles.values() if r is P) >= 9
    assert all(b - a >= 1.0 for (a, _), (b, _) in itertools.pairwise(switches))


def test_a_load_that_alternates_near_the_cooldown_does_not_flap() -> None:
    # Prompt-heavy and decode-heavy phases of 30 s for 10 minutes.
    load = []
    for k in range(20):
        load.append((30.0 * (k + 1), 6000 if k % 2 == 0 else 1000, 8 if k % 2 == 0 else 36))
    switches, _ = run(load)
    # Each phase may move workers, but at most max_switches_per_minute (4) x 10 minutes in all.
    assert len(switches) <= 40
    assert reversals(switches) <= 20  # at most one direction change per phase


def test_a_steady_load_reaches_a_split_and_stays() -> None:
    # 5000 tok/s needs 5 prefill workers; 8 streams fit on 2 decode workers (50 ms steps).
    switches, cluster = run([(600, 5000, 8)])
    assert len(switches) == 2 and reversals(switches) == 0
    assert all(at < 60 for at, _ in switches), switches
    assert cluster.backlog == 0


def test_a_donor_is_judged_by_its_recent_peak() -> None:
    """Decode was busy 3 s ago and is quiet now: it cannot spare a worker until the busy moment has
    left the spare window (5 s)."""
    balancer = Balancer(SLO)
    busy = [w("p0", P), w("d0", D, running=4, decode_step_s=0.12), w("d1", D, running=4, decode_step_s=0.12)]
    balancer.decide([dataclasses.replace(x, seen_at=0.0) for x in busy], 0.0)
    hot_prefill = [w("p0", P, **BACKLOG), w("d0", D), w("d1", D)]
    decision = decide_after_sustain(balancer, hot_prefill, start=2.0)
    assert decision.switch is None and "cannot spare" in decision.why
    assert decide_after_sustain(balancer, hot_prefill, start=5.5).switch is not None


def test_arriving_prompt_tokens_move_a_worker_before_a_backlog_builds() -> None:
    """2100 prompt tokens/s reach two prefill workers of 1000 tok/s each: the queue grows by only
    100 tokens/s (its backlog is far inside the TTFT budget), but demand exceeds the pool."""
    balancer = Balancer(SLO)
    decision = None
    for tick in range(8):
        t = tick * 0.5
        workers = [w(f"p{i}", P, seen_at=t, prefill_tokens_total=int(1000 * t), queued_prefill_tokens=int(50 * t))
                   for i in range(2)] + [w("d0", D, seen_at=t), w("d1", D, seen_at=t)]
        decision = balancer.decide(workers, t)
        if decision.switch:
            break
    assert decision is not None and decision.switch == Switch("d0", D, P, "prefill-backlog"), decision
    assert decision.pressures is not None and decision.pressures.backlog_s < 0.2
    assert abs(decision.pressures.arrivals - 2100) < 1


def test_arrivals_count_handed_over_work_once_and_skip_a_restarted_worker() -> None:
    balancer = Balancer(SLO)
    before = [w("p0", P, queued_prefill_tokens=500, prefill_tokens_total=10_000),
              w("p1", P, prefill_tokens_total=20_000), w("d0", D, prefill_tokens_total=300)]
    balancer.arrivals(before, 0.0)
    # p0 handed its 500 queued tokens to p1 (which computed them), computed 100 of new work itself;
    # d0 restarted (its counter went back): it is left out.
    after = [w("p0", P, prefill_tokens_total=10_100), w("p1", P, prefill_tokens_total=20_500),
             w("d0", D, prefill_tokens_total=5)]
    assert balancer.arrivals(after, 1.0) == 100.0


def test_growing_streams_move_a_worker_before_step_times_cross_the_threshold() -> None:
    """Two decode workers run 4 streams each at 60 % of the TPOT target, and streams queue up on each at 4
    a second: in the next 2 s the pool takes 16 more at 15 ms each, 2.4 workers' worth. Without the
    growth term (growth_window_s 0) the same snapshots move nothing: step times have not moved yet."""
    def first_switch(balancer: Balancer) -> Switch | None:
        for tick in range(6):
            t = tick * 0.5
            decode = {"running": 4, "decode_step_s": 0.06, "waiting": 2 * tick, "seen_at": t}
            workers = [w("p0", P, seen_at=t), w("p1", P, seen_at=t), w("d0", D, **decode), w("d1", D, **decode)]
            decision = balancer.decide(workers, t)
            if decision.switch:
                return decision.switch
        return None

    assert first_switch(Balancer(SLO)) == Switch("p0", P, D, "decode-pressure")
    assert first_switch(Balancer(SLO, Settings(growth_window_s=0))) is None
