"""The worker deployment's size from the planner's model: a deployment-level custom autoscaling policy.

Why a policy and not the planner driving Serve's external scaler: the policy runs inside Serve's
controller on the metrics Serve already collects from every replica (`Worker.record_autoscaling_stats`,
the same figures each worker's WatchStats reports), so it needs neither a Prometheus that scrapes the
workers nor a process of its own holding an API credential; and Serve keeps applying its bounds
(min/max replicas, capacity). Ray 2.60 documents application-level custom policies as not yet
supported, so the one worker deployment's size is the decision: the planner sizes prefill and decode
as in `triphase up --autoscale --role-switching` (control/planner.py, throughput mode: the TTFT and
TPOT percentiles are measured by the router, which Serve's per-deployment metrics do not reach), and
the sum is the deployment's target; the role balancer then splits the workers between the roles.

Per replica, the stats are the latest report (`raw_metrics`): role, running streams, queued prompt
tokens, prompt tokens computed so far, the measured prefill rate and decode step time, KV usage.
The policy turns the counters into rates between its own decisions (`interval_s` apart; in between it
answers the target it last set), so a replica that restarts (its counter back to 0) adds nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from triphase.common.roles import Role
from triphase.control.balancer import Slo
from triphase.control.planner import DecodeSample, Planner, PoolView, Settings, Signals

# record_autoscaling_stats keys; the role travels as a number (Serve's metrics are floats).
ROLE_CODES = {Role.PREFILL: 1.0, Role.DECODE: 2.0, Role.BOTH: 3.0, Role.ENCODE: 4.0}
STATS = ("role", "running", "queued_prefill_tokens", "prefill_tokens_total", "prefill_tokens_per_s",
         "decode_step_s", "kv_usage")


def worker_stats(stats: Any) -> dict[str, float]:
    """A worker's WorkerStats (protobuf) as Serve's custom autoscaling metrics."""
    from triphase.common import role_pb

    total = stats.total_kv_blocks
    return {"role": ROLE_CODES[role_pb.from_pb(stats.role)], "running": float(stats.running_requests),
            "queued_prefill_tokens": float(stats.queued_prefill_tokens),
            "prefill_tokens_total": float(stats.prefill_tokens_total),
            "prefill_tokens_per_s": float(stats.prefill_tokens_per_second),
            "decode_step_s": float(stats.decode_step_seconds),
            "kv_usage": 1 - stats.free_kv_blocks / total if total else 0.0}


def _role(code: float) -> Role:
    return min(ROLE_CODES, key=lambda role: abs(ROLE_CODES[role] - code))


class SloPolicy:
    """`autoscaling_config.policy: {policy_function: triphase.rayserve.autoscaling:SloPolicy,
    policy_kwargs: {...}}`; Serve builds one and calls it with an AutoscalingContext."""

    def __init__(self, ttft_seconds: float, tpot_seconds: float, interval_s: float = 10.0,
                 stabilization_s: float = 60.0) -> None:
        self.planner = Planner(Slo(ttft_seconds, tpot_seconds),
                               Settings(stabilization_s=stabilization_s, role_switching=True, load_mode=False))
        self.interval_s = interval_s
        self.last: tuple[float, dict[str, float]] | None = None  # (when, prompt tokens computed per replica)
        self.decided_at = -math.inf
        self.target: int | None = None
        self.why = ""
        self.signals: Signals | None = None  # the last decision's inputs (for its log and tests)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        if self.target is not None and now - self.decided_at < self.interval_s:
            return self.target, {"why": self.why}
        if ctx.target_num_replicas > ctx.current_num_replicas:  # the last increase is still starting
            self.why = "waiting for the replicas asked for to start"
            return ctx.target_num_replicas, {"why": self.why}
        latest = {name: {str(replica): series[-1].value for replica, series in by_replica.items() if series}
                  for name, by_replica in (ctx.raw_metrics or {}).items()}
        target = self.decide(now, latest, ctx.current_num_replicas, ctx.capacity_adjusted_min_replicas,
                             ctx.capacity_adjusted_max_replicas)
        self.decided_at, self.target = now, target
        return target, {"why": self.why}

    def decide(self, now: float, latest: Mapping[str, Mapping[str, float]], current: int, low: int,
               high: int) -> int:
        """The deployment's target from each replica's latest stats (name -> replica -> value)."""
        replicas = set(latest.get("role", {}))
        if not replicas:
            self.why = "no stats from the workers yet"
            return current
        stat = {name: latest.get(name, {}) for name in STATS}
        totals = {r: stat["prefill_tokens_total"].get(r, 0.0) for r in replicas}
        rate = None
        if self.last is not None and now > self.last[0]:
            grown = sum(max(0.0, totals[r] - self.last[1][r]) for r in replicas if r in self.last[1])
            rate = grown / (now - self.last[0])
        self.last = (now, totals)
        roles = {r: _role(stat["role"][r]) for r in replicas}
        prefill_rates = [stat["prefill_tokens_per_s"].get(r, 0.0) for r in replicas
                         if roles[r] in (Role.PREFILL, Role.BOTH) and stat["prefill_tokens_per_s"].get(r, 0.0) > 0]
        decode = tuple(DecodeSample(stat["running"].get(r, 0.0), stat["decode_step_s"].get(r, 0.0),
                                    stat["kv_usage"].get(r, 0.0))
                       for r in replicas if roles[r] in (Role.DECODE, Role.BOTH))
        signals = Signals(prefill_tokens_rate=rate,
                          queued_prefill_tokens=sum(stat["queued_prefill_tokens"].get(r, 0.0) for r in replicas),
                          prefill_tokens_per_s=sum(prefill_rates) / len(prefill_rates) if prefill_rates else None,
                          decode=decode)
        by_role = {role: sum(1 for r in replicas if roles[r] == role) for role in (Role.PREFILL, Role.DECODE)}
        by_role[Role.DECODE] += sum(1 for r in replicas if roles[r] == Role.BOTH)
        pools = {role: PoolView(role, by_role[role], by_role[role], 1 if low > 1 else 0, high)
                 for role in (Role.PREFILL, Role.DECODE)}
        self.signals = signals
        plan = self.planner.plan(now, signals, pools, by_role)
        target = max(low, min(high, sum(plan.replicas.values())))
        self.why = plan.why
        return target
