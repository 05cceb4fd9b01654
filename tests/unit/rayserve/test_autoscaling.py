"""The worker deployment's autoscaling policy: the planner's model on Serve's per-replica stats."""

from __future__ import annotations

from types import SimpleNamespace

from triphase.common.roles import Role
from triphase.rayserve.autoscaling import ROLE_CODES, SloPolicy

PREFILL, DECODE = ROLE_CODES[Role.PREFILL], ROLE_CODES[Role.DECODE]


def stats(**replicas: dict[str, float]) -> dict[str, dict[str, float]]:
    """name -> replica -> value, from replica -> name -> value."""
    names = {name for values in replicas.values() for name in values}
    return {name: {r: values[name] for r, values in replicas.items() if name in values} for name in names}


def replica(role: float, total: float, *, running: float = 0, queued: float = 0, rate: float = 1000.0,
            step: float = 0.0, kv: float = 0.0) -> dict[str, float]:
    return {"role": role, "running": running, "queued_prefill_tokens": queued, "prefill_tokens_total": total,
            "prefill_tokens_per_s": rate if role == PREFILL else 0.0, "decode_step_s": step, "kv_usage": kv}


def test_a_prompt_flood_grows_the_deployment_to_the_prefill_workers_it_needs() -> None:
    policy = SloPolicy(ttft_seconds=2.0, tpot_seconds=0.1, interval_s=10, stabilization_s=60)
    # 3000 prompt tokens a second arrive from t=0; one prefill worker computes 1000: 3 workers' worth,
    # / 0.85 target utilization -> 4 prefill workers, and the one decode worker stays (it runs streams).
    # The first rise is extrapolated (the planner's forecast: 0 -> 3 workers' worth suggests 6 next),
    # and the target settles as the trend flattens. The pools as Serve shows them stay 1 + 1 here.
    targets = [policy.decide(t, stats(a=replica(PREFILL, 3000 * t), b=replica(DECODE, 0, running=2, step=0.02)),
                             2, 2, 16) for t in (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)]
    assert targets == [2, 9, 7, 6, 5, 5]
    assert policy.signals is not None and policy.signals.prefill_tokens_rate == 3000
    assert policy.why == "prefill 1 -> 4 (throughput)"


def test_the_target_stays_within_serves_bounds() -> None:
    policy = SloPolicy(ttft_seconds=2.0, tpot_seconds=0.1)
    policy.decide(0.0, stats(a=replica(PREFILL, 0), b=replica(DECODE, 0)), 2, 2, 3)
    assert policy.decide(10.0, stats(a=replica(PREFILL, 300_000), b=replica(DECODE, 0)), 2, 2, 3) == 3


def test_a_restarted_replica_adds_no_rate() -> None:
    policy = SloPolicy(ttft_seconds=2.0, tpot_seconds=0.1)
    policy.decide(0.0, stats(a=replica(PREFILL, 50_000), b=replica(DECODE, 0)), 2, 2, 8)
    # a's counter restarts at 0 (a new process) and c is new: only b's 10000 tokens count
    policy.decide(10.0, stats(a=replica(PREFILL, 0), b=replica(DECODE, 10_000), c=replica(DECODE, 900)), 3, 2, 8)
    assert policy.signals is not None and policy.signals.prefill_tokens_rate == 1000


def ctx(now: float, current: int, target: int, latest: dict[str, dict[str, float]]) -> SimpleNamespace:
    raw = {name: {r: [SimpleNamespace(timestamp=now, value=v)] for r, v in values.items()}
           for name, values in latest.items()}
    return SimpleNamespace(current_time=now, current_num_replicas=current, target_num_replicas=target,
                           raw_metrics=raw, capacity_adjusted_min_replicas=2, capacity_adjusted_max_replicas=8)


def test_serve_calls_it_often_and_it_decides_once_per_interval() -> None:
    policy = SloPolicy(ttft_seconds=2.0, tpot_seconds=0.1, interval_s=10)
    quiet = stats(a=replica(PREFILL, 0), b=replica(DECODE, 0))
    assert policy(ctx(0.0, 2, 2, quiet))[0] == 2
    flood = stats(a=replica(PREFILL, 30_000), b=replica(DECODE, 0, running=2, step=0.02))
    assert policy(ctx(5.0, 2, 2, flood))[0] == 2  # within the interval: the last decision
    assert policy(ctx(10.0, 2, 2, flood))[0] == 8  # 9 (as above), within Serve's bounds [2, 8]
    # while Serve starts the six new replicas, nothing more is asked for
    assert policy(ctx(20.0, 2, 8, stats(a=replica(PREFILL, 90_000), b=replica(DECODE, 0))))[0] == 8
