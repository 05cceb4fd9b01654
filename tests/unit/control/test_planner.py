"""The planner's policy on synthetic series: step, burst, ramp, gaps, oscillation traps, scale to the
minimum, pending pods, bounds and agreement with a role switch the balancer holds."""

from __future__ import annotations

import dataclasses
import math

import pytest

from triphase.common.profile import Profile
from triphase.common.roles import Role
from triphase.control.planner import (
    DecodeSample,
    Planner,
    PoolView,
    Settings,
    Signals,
    Slo,
    StepModel,
    fit_step_model,
    forecast,
)

P, D = Role.PREFILL, Role.DECODE
SLO = Slo(ttft_s=4.0, tpot_s=0.2)
RATE = 1000.0  # prompt tokens per second one prefill worker computes
STEP = StepModel(0.04, 0.02)  # the sim's decode timing: 8 streams per worker at a 0.2 s TPOT
INTERVAL = 60.0


def signals(prefill_workers: float = 1.0, streams: tuple[float, ...] = (4.0,), ttft: float = 1.0, tpot: float = 0.1,
            queued: float = 0.0, rate: float = 1.0) -> Signals:
    """Load worth `prefill_workers` prefill workers at the planner's utilization, decode workers running
    `streams` with the sim's step time."""
    return Signals(request_rate=rate, prefill_tokens_rate=prefill_workers * RATE, ttft_s=ttft, tpot_s=tpot,
                   queued_prefill_tokens=queued, prefill_tokens_per_s=RATE,
                   decode=tuple(DecodeSample(s, STEP.fixed_s + STEP.per_stream_s * s, 0.05 * s) for s in streams))


def pools(p: int = 2, d: int = 2, ready: dict[Role, int] | None = None, lo: int = 1, hi: int = 10,
          ) -> dict[Role, PoolView]:
    ready = ready or {}
    return {P: PoolView(P, p, ready.get(P, p), lo, hi), D: PoolView(D, d, ready.get(D, d), lo, hi)}


def planner(**settings: object) -> Planner:
    """Decode capacity from the sim's step model (as a profile gives it), so the numbers are exact."""
    return Planner(SLO, Settings(**{"stabilization_s": 300.0, **settings}), STEP)  # type: ignore[arg-type]


class Sim:
    """Pools that become Ready as soon as they are asked for: the plan each interval, applied."""

    def __init__(self, planner: Planner, p: int = 2, d: int = 2) -> None:
        self.planner = planner
        self.replicas = {P: p, D: d}
        self.history: list[dict[Role, int]] = []
        self.t = 0.0

    def step(self, observed: Signals | None) -> dict[Role, int]:
        self.t += INTERVAL
        plan = self.planner.plan(self.t, observed, pools(self.replicas[P], self.replicas[D], hi=50))
        self.replicas = dict(plan.replicas)
        self.history.append(dict(self.replicas))
        return self.replicas


def test_the_step_model_is_recovered_from_workers_at_different_loads() -> None:
    model = fit_step_model([(s, STEP.fixed_s + STEP.per_stream_s * s) for s in (2, 5, 9)])
    assert model is not None
    assert model.fixed_s == pytest.approx(0.04) and model.per_stream_s == pytest.approx(0.02)
    assert model.streams_within(0.2) == pytest.approx(8.0)


def test_one_load_level_gives_a_proportional_model_that_errs_towards_more_workers() -> None:
    model = fit_step_model([(4, 0.12), (4, 0.12)])
    assert model is not None and model.fixed_s == 0.0 and model.per_stream_s == pytest.approx(0.03)
    assert model.streams_within(0.2) < STEP.streams_within(0.2)
    assert fit_step_model([]) is None and fit_step_model([(0, 0.05)]) is None


@pytest.mark.parametrize("series, expected", [
    ([], 0.0), ([3.0], 3.0), ([1.0, 2.0, 3.0], 4.0),  # a rise continues one step
    ([3.0, 2.0, 1.0], 1.0), ([2.0, 2.0, 2.0], 2.0),  # a fall is not extrapolated
])
def test_the_forecast_extrapolates_rises_only(series: list[float], expected: float) -> None:
    assert forecast(series) == pytest.approx(expected)


def test_a_step_in_load_is_met_at_once_by_throughput() -> None:
    sim = Sim(planner())
    assert sim.step(signals(1.0, (4.0, 4.0))) == {P: 2, D: 2}
    plan = sim.planner.plan(sim.t + INTERVAL, signals(4.0, (12.0, 12.0)), pools(2, 2))
    # prefill: 4 workers' worth / 0.85 -> 5; decode: 24 streams at 8 per worker / 0.85 -> 4 (and the
    # trend from the earlier, lower interval adds to the forecast: more, never fewer).
    assert plan.replicas[P] >= 5 and plan.replicas[D] >= 4
    assert {c.reason for c in plan.changes} == {"throughput"}


def test_a_burst_over_the_ttft_target_adds_a_worker_even_when_throughput_says_enough() -> None:
    plan = planner().plan(0.0, signals(1.0, (4.0, 4.0), ttft=6.0), pools(2, 2))
    assert plan.replicas[P] == 3 and [c.reason for c in plan.changes] == ["ttft-slo"]
    plan = planner().plan(0.0, signals(1.0, (4.0, 4.0), tpot=0.3), pools(2, 2))
    assert plan.replicas[D] == 3 and [c.reason for c in plan.changes] == ["tpot-slo"]


def test_a_ramp_is_followed_up_and_never_down() -> None:
    sim = Sim(planner())
    for i in range(10):
        load = 1.0 + i  # prefill workers' worth, and 8 streams more per interval
        replicas = sim.step(signals(load, tuple([4.0 * (i + 1) / 2] * 2)))
        assert replicas[P] >= math.ceil(load / 0.85)
        assert replicas[D] * 8 * 0.85 >= 4.0 * (i + 1) - 1e-9
    assert all(a[r] <= b[r] for a, b in zip(sim.history, sim.history[1:], strict=False) for r in (P, D))


def test_a_decrease_waits_for_the_stabilization_window() -> None:
    sim = Sim(planner(stabilization_s=300.0), p=6, d=2)
    sim.step(signals(5.0))
    for _ in range(4):  # 4 intervals = 240 s of low load: still inside the 300 s window
        assert sim.step(signals(1.0))[P] == 6
    plan_held = sim.planner.plan(sim.t, signals(1.0), pools(6, 2))
    assert plan_held.held == "stabilizing"
    for _ in range(2):
        sim.step(signals(1.0))
    assert sim.replicas[P] == 2


def test_an_alternating_load_does_not_make_the_pool_oscillate() -> None:
    sim = Sim(planner(stabilization_s=300.0))
    for i in range(30):
        sim.step(signals(4.0 if i % 2 == 0 else 1.0))
    prefill = [h[P] for h in sim.history]
    reversals = sum(1 for a, b, c in zip(prefill, prefill[1:], prefill[2:], strict=False) if (b - a) * (c - b) < 0)
    assert reversals == 0 and prefill[-1] == max(prefill)


def test_when_traffic_stops_the_pools_go_to_their_minimum_after_the_window() -> None:
    sim = Sim(planner(stabilization_s=120.0), p=4, d=4)
    idle = Signals(request_rate=0.0, prefill_tokens_rate=0.0, prefill_tokens_per_s=RATE)
    sim.step(signals(3.0, (20.0, 20.0, 20.0, 20.0)))
    for _ in range(3):
        sim.step(idle)
    assert sim.replicas == {P: 1, D: 1}
    assert sim.planner.plan(sim.t, idle, pools(1, 1)).changes == ()


def test_missing_metrics_change_nothing_and_planning_resumes_when_they_return() -> None:
    p = planner()
    plan = p.plan(0.0, None, pools(2, 2))
    assert plan.replicas == {P: 2, D: 2} and plan.changes == () and plan.held == "no-metrics"
    assert p.plan(60.0, signals(4.0), pools(2, 2)).replicas[P] == 5


def test_nothing_changes_while_the_last_change_is_not_ready() -> None:
    plan = planner().plan(0.0, signals(6.0), pools(3, 2, ready={P: 2}))
    assert plan.changes == () and plan.held == "pending" and "prefill 2/3" in plan.why


@pytest.mark.parametrize("load, expected, reason", [(20.0, 10, "max"), (0.05, 2, None)])
def test_pools_stay_within_their_bounds(load: float, expected: int, reason: str | None) -> None:
    plan = planner(stabilization_s=0.0).plan(0.0, signals(load), pools(4, 2, lo=2, hi=10))
    assert plan.replicas[P] == expected
    if reason:
        assert [c.reason for c in plan.changes if c.role is P] == [reason]


def test_a_role_switch_the_balancer_holds_is_the_split_not_something_to_undo() -> None:
    """Pools of 2 + 2, but the balancer moved a decode-pool worker to prefill: 3 serve prefill, 1
    decode. With demand for exactly that split, the planner changes nothing (with switching off it
    would have grown prefill and shrunk decode)."""
    observed = signals(2.4, (5.0,))  # prefill 2.4 / 0.85 -> 3 workers; decode 5 streams -> 1 worker
    by_role = {P: 3, D: 1}
    plan = planner(role_switching=True, stabilization_s=0.0).plan(0.0, observed, pools(2, 2), by_role)
    assert plan.changes == ()
    fighting = planner(role_switching=False, stabilization_s=0.0).plan(0.0, observed, pools(2, 2))
    assert fighting.replicas == {P: 3, D: 1}


def test_with_switching_a_shortfall_grows_the_short_roles_pool_and_a_covered_one_is_left_alone() -> None:
    switching = planner(role_switching=True, stabilization_s=0.0)
    short = switching.plan(0.0, signals(2.4, (14.0,)), pools(2, 2), {P: 3, D: 1})  # decode needs 3
    assert short.replicas == {P: 2, D: 4} and [c.reason for c in short.changes] == ["throughput"]
    covered = planner(role_switching=True, stabilization_s=0.0).plan(
        0.0, signals(1.6, (10.0,)), pools(2, 2), {P: 3, D: 1})  # prefill needs 2, decode 2: a switch covers it
    assert covered.changes == ()


def test_load_mode_alone_steps_by_one() -> None:
    p = planner(throughput_mode=False, stabilization_s=0.0)
    assert p.plan(0.0, signals(1.0, (4.0, 4.0), tpot=0.25), pools(2, 2)).replicas[D] == 3
    assert p.plan(60.0, signals(0.5, (1.0, 1.0), ttft=0.5, tpot=0.06), pools(3, 3)).replicas == {P: 2, D: 2}


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="utilizations"):
        Settings(target_utilization=1.5)
    with pytest.raises(ValueError, match="at least one"):
        Settings(throughput_mode=False, load_mode=False)


def test_a_profile_gives_the_step_model_with_its_context_term_folded_in() -> None:
    from triphase.common.profile import Profile

    model = StepModel.from_profile(Profile(0.01, 0.001, 0.04, 0.02, 1e-5), context_tokens=1000)
    assert model.fixed_s == 0.04 and model.per_stream_s == pytest.approx(0.03)
    assert model.streams_within(0.2) == pytest.approx(16 / 3)


def test_decode_demand_is_the_tokens_wanted_not_the_streams_an_overload_inflates() -> None:
    """One decode worker, overloaded: 12 streams, then 24 a minute later (steps of 0.28 s, then 0.52 s,
    against a 0.2 s target). Counting streams says 3 workers; the tokens streamed (saturated) say about
    1.2; the tokens wanted, with the streams piling up at 0.2 a second, lie between."""
    p = planner()

    def overloaded(streams: float, served: float) -> Signals:
        step = STEP.fixed_s + STEP.per_stream_s * streams
        return Signals(request_rate=1.0, prefill_tokens_rate=0.0, prefill_tokens_per_s=RATE, tpot_s=step,
                       decode=(DecodeSample(streams, step, 0.0),), generation_tokens_rate=served)

    first = p.decode_demand(overloaded(12, 12 / 0.28), now=0.0)
    assert first == pytest.approx(12 / 0.28 * 0.2 / 8)  # nothing to compare with yet: what was streamed
    served = 24 / 0.52
    second = p.decode_demand(overloaded(24, served), now=60.0)
    assert second == pytest.approx((served + 0.2 * served / 1.0) * 0.2 / 8)
    assert served * 0.2 / 8 < second < 24 / 8


def test_just_after_a_shift_the_stream_count_bounds_the_decode_demand() -> None:
    """Few requests finished yet (0.05/s) while many tokens stream: tokens per request look huge, and
    their product with the growth in streams would ask for dozens of workers; 20 streams ask for 2.5."""
    p = planner()
    step = STEP.fixed_s + STEP.per_stream_s * 10

    def shifted(streams: float) -> Signals:
        return Signals(request_rate=0.05, prefill_tokens_rate=0.0, prefill_tokens_per_s=RATE,
                       decode=(DecodeSample(streams / 2, step, 0.0),) * 2, generation_tokens_rate=streams / step)

    p.decode_demand(shifted(4), now=0.0)
    assert p.decode_demand(shifted(20), now=5.0) == pytest.approx(20 / 8)


E = Role.ENCODE


def with_encode(observed: Signals, image_rate: float, encode_s: float | None, queued: float = 0.0) -> Signals:
    return dataclasses.replace(observed, image_rate=image_rate, encode_s=encode_s, queued_images=queued)


def pools_with_encode(e: int, lo: int = 1, hi: int = 8) -> dict[Role, PoolView]:
    return {**pools(2, 2), E: PoolView(E, e, e, lo, hi)}


@pytest.mark.parametrize(("image_rate", "encode_s", "queued", "expected"), [
    (10.0, 0.25, 0.0, 3),  # 2.5 workers of encoding / 0.85 utilization
    (0.0, 0.2, 20.0, 2),  # a queue of 20 images worked off within the 4 s TTFT target: 1 worker / 0.85
    (1.0, 0.1, 0.0, 1),  # 0.1 of a worker: the minimum
])
def test_the_encode_pool_is_sized_by_images_arriving_and_queued(image_rate, encode_s, queued, expected) -> None:
    observed = with_encode(signals(1.6, (10.0,)), image_rate, encode_s, queued)
    demand = (image_rate + queued / SLO.ttft_s) * encode_s
    plan = planner(stabilization_s=0.0).plan(0.0, observed, pools_with_encode(1))
    assert plan.demand[E] == pytest.approx(demand)
    assert plan.replicas[E] == max(1, math.ceil(demand / 0.85))
    assert plan.replicas[E] == expected


def test_the_encode_pool_stays_out_of_the_balancers_split_and_unknown_cost_changes_nothing() -> None:
    observed = with_encode(signals(2.4, (5.0,)), 10.0, 0.25)
    plan = planner(role_switching=True, stabilization_s=0.0).plan(0.0, observed, pools_with_encode(1), {P: 3, D: 1})
    assert plan.replicas == {P: 2, D: 2, E: 3}  # the prefill/decode split is the balancer's, as before
    unknown = with_encode(signals(1.6, (10.0,)), 10.0, None)  # images arrive, none encoded yet
    assert planner(stabilization_s=0.0).plan(0.0, unknown, pools_with_encode(2)).replicas[E] == 2


def test_a_profile_gives_prefill_capacity_until_a_rate_is_measured():
    # Prompts arriving before any prefill ran: without a profile the demand is unknown, with one it is
    # the arrivals over the profile's rate; once Prometheus measures a rate, that one counts.
    unmeasured = dataclasses.replace(signals(prefill_workers=3.0), prefill_tokens_per_s=0.0)
    assert Planner(SLO, Settings(), STEP).prefill_demand(unmeasured) is None
    profiled = Planner(SLO, Settings())
    profiled.use_profile(Profile(0.0, 0.002, STEP.fixed_s, STEP.per_stream_s))  # 500 prompt tokens/s
    assert profiled.prefill_demand(unmeasured) == pytest.approx(3.0 * RATE / 500.0)
    assert profiled.prefill_demand(signals(prefill_workers=3.0)) == pytest.approx(3.0)  # measured: RATE
    assert profiled.step_model() == STEP
    profiled.use_profile(None)
    assert profiled.prefill_demand(unmeasured) is None and profiled.step_model() is None
