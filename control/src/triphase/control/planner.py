"""The planner's policy: how many workers each pool should have (pure: no I/O, no clock).

The slow loop beside the role balancer's fast one. Every interval it gets what Prometheus measured over
the last window (`Signals`) and the pools as they stand (`PoolView`), and answers the replicas each pool
should have (`Plan`). Demand is measured in workers' worth of capacity at the SLO, per role:

- prefill demand = (prompt tokens prefilled per second + the queued prompt tokens to clear within one
  TTFT target) ÷ (one worker's measured prefill rate, or a profile's until one is measured, *
  `prefill_utilization`, 1 by default: the queueing headroom that keeps the TTFT percentile, not the
  mean, under its target is `target_utilization`, the same for both roles).
- decode demand = the output tokens wanted per second ÷ what one worker streams at the TPOT target
  (the streams it carries at that step time ÷ the target). Tokens wanted = tokens streamed per second
  + the growth of running streams per second * tokens per request: under overload every stream
  slows, so the stream count inflates and the streamed tokens saturate, and neither alone is the
  demand. Running streams ÷ streams per worker bounds it from above (and stands in when nothing
  was streamed or finished in the window). The streams per worker come from a step-time model
  `step = fixed + per_stream * streams`, fitted to the (streams, step) pairs the decode workers
  reported over the recent intervals (or given by a profile); with one point only, the model is
  proportional (fixed = 0), which overestimates the cost per stream and so errs towards more
  workers. KV caps it too: streams * KV per stream stays under `kv_high`.

Two modes, both on by default, combined per role:
- throughput: the next interval's demand, forecast from the trend of the last `forecast_points`
  intervals (extrapolated upwards only: a falling load is met by the stabilization window, not by
  prediction), divided by `target_utilization`, rounded up.
- load: +1 when the measured TTFT (prefill) or TPOT (decode) percentile exceeds its target, whatever
  throughput says (its capacity estimate may be wrong); a decrease only while the percentile is
  within `down_slo_fraction` of its target and the remaining workers stay under `target_utilization`
  (load * N ÷ (N - 1) still meets it).
Increases apply at once; a decrease applies only when every recommendation over the last
`stabilization_s` agrees (the pool is sized for the highest of them), so a lull is not a reason.
When traffic stops (no requests, streams or queued prompts over the window) the recommendation is
each pool's minimum, subject to the same stabilization. Every pool stays within [min, max].

The two loops divide the work: the balancer decides which role each worker serves, the planner how many
workers there are. With role switching on, the planner counts workers by the role they serve now, so a
switch the balancer made is the current split rather than something to undo; it changes the total by
the sum of the roles' shortfalls and surpluses, adding new workers to the pool of the role short of them
and removing them from the pool of the role with a surplus. A shortfall in one role that a surplus in
the other covers is left to the balancer (a switch takes a second; a new worker takes minutes). With
role switching off, each pool is sized for its own role.

It holds (no change, a reason saying why) while a pool has fewer Ready workers than it asks for (the
last change is not done: more of the same would overshoot), and when the metrics are missing.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence

from triphase.common.profile import Profile
from triphase.common.roles import Role
from triphase.control.balancer import Slo  # the same targets drive both loops

ROLES = (Role.PREFILL, Role.DECODE, Role.ENCODE)
SWITCHED = (Role.PREFILL, Role.DECODE)  # the roles the balancer moves workers between


@dataclasses.dataclass(frozen=True)
class Settings:
    target_utilization: float = 0.85  # of each role's capacity at its SLO
    prefill_utilization: float = 1.0  # of a prefill worker's measured rate that counts as capacity
    kv_high: float = 0.9  # KV usage a decode worker may reach
    down_slo_fraction: float = 0.8  # a role may shrink only while its percentile is under this * target
    stabilization_s: float = 300.0  # a decrease must be recommended this long
    forecast_points: int = 4  # intervals the trend is fitted over
    throughput_mode: bool = True
    load_mode: bool = True
    role_switching: bool = False  # the balancer moves workers: size the total, keep its split

    def __post_init__(self) -> None:
        if not (0 < self.target_utilization <= 1 and 0 < self.prefill_utilization <= 1 and 0 < self.kv_high <= 1
                and 0 < self.down_slo_fraction <= 1):
            raise ValueError("utilizations, kv_high and down_slo_fraction must be in (0, 1]")
        if self.stabilization_s < 0 or self.forecast_points < 1:
            raise ValueError("stabilization_s must not be negative and forecast_points must be at least 1")
        if not (self.throughput_mode or self.load_mode):
            raise ValueError("at least one of throughput_mode and load_mode must be on")


@dataclasses.dataclass(frozen=True)
class DecodeSample:
    """One decode worker at one moment: streams it runs, its mean step time, its KV usage."""

    streams: float
    step_s: float
    kv_usage: float


@dataclasses.dataclass(frozen=True)
class Signals:
    """What Prometheus measured over the last window; None where it had no data."""

    request_rate: float | None = None  # requests finishing per second
    prefill_tokens_rate: float | None = None  # prompt tokens computed per second by all workers (cache hits
    # need no compute and are left out; a backlog is `queued_prefill_tokens`)
    ttft_s: float | None = None  # at the SLO percentile
    tpot_s: float | None = None
    queued_prefill_tokens: float | None = None  # waiting on the prefill workers now
    prefill_tokens_per_s: float | None = None  # one prefill worker's measured rate (mean over workers)
    decode: tuple[DecodeSample, ...] = ()  # one per decode worker
    generation_tokens_rate: float | None = None  # tokens streamed to clients per second
    attainment: float | None = None  # share of requests that met the SLO over the window
    model: str = ""  # the served model's name, for labelling
    image_rate: float | None = None  # images arriving in requests per second
    encode_s: float | None = None  # seconds an encode worker spends on one image (mean over the window)
    queued_images: float | None = None  # images waiting on (or being encoded by) the encode workers now

    @property
    def streams(self) -> float:
        return sum(s.streams for s in self.decode)

    @property
    def idle(self) -> bool:
        return (self.request_rate or 0.0) == 0.0 and self.streams == 0 and not self.queued_prefill_tokens \
            and not self.prefill_tokens_rate


@dataclasses.dataclass(frozen=True)
class PoolView:
    """A pool as the API server shows it: what it asks for, what is Ready, and its bounds."""

    role: Role
    replicas: int
    ready: int
    min_replicas: int
    max_replicas: int

    @property
    def pending(self) -> bool:
        return self.ready < self.replicas


@dataclasses.dataclass(frozen=True)
class Change:
    role: Role  # the pool
    from_replicas: int
    to_replicas: int
    reason: str  # throughput, ttft-slo, tpot-slo, idle, min, max


@dataclasses.dataclass(frozen=True)
class Plan:
    replicas: dict[Role, int]  # every pool's desired replicas (unchanged where no change)
    changes: tuple[Change, ...]
    why: str  # what was decided, or what held the planner back
    demand: dict[Role, float] = dataclasses.field(default_factory=dict)  # forecast, in workers
    held: str = ""  # pending, no-metrics, stabilizing: a reason nothing (or less) changed


@dataclasses.dataclass(frozen=True)
class StepModel:
    """Decode step time against the number of streams a worker runs."""

    fixed_s: float
    per_stream_s: float

    @classmethod
    def from_profile(cls, profile: Profile, context_tokens: float = 1024.0) -> StepModel:
        """The profile's decode model for streams of `context_tokens` each (the context term folded in)."""
        per_stream = profile.decode_per_seq_s + profile.decode_per_context_token_s * context_tokens
        return cls(profile.decode_base_s, per_stream)

    def streams_within(self, tpot_s: float) -> float:
        """Streams one worker can run with steps no longer than `tpot_s` (0 when even one cannot)."""
        if self.per_stream_s <= 0:
            return math.inf
        return max(0.0, (tpot_s - self.fixed_s) / self.per_stream_s)


def fit_step_model(points: Sequence[tuple[float, float]]) -> StepModel | None:
    """Least squares over (streams, step seconds) pairs with streams > 0, constrained to fixed ≥ 0 and
    per stream > 0; proportional (fixed = 0) when the streams do not vary. None without points."""
    used = [(s, t) for s, t in points if s > 0 and t > 0]
    if not used:
        return None
    n = len(used)
    mean_s = sum(s for s, _ in used) / n
    mean_t = sum(t for _, t in used) / n
    var = sum((s - mean_s) ** 2 for s, _ in used)
    if var > 1e-9:
        slope = sum((s - mean_s) * (t - mean_t) for s, t in used) / var
        fixed = mean_t - slope * mean_s
        if slope > 0 and fixed >= 0:
            return StepModel(fixed, slope)
    # Proportional through the origin: the slope that fits best with fixed = 0.
    return StepModel(0.0, sum(s * t for s, t in used) / sum(s * s for s, _ in used))


def forecast(series: Sequence[float]) -> float:
    """The next value: the latest, raised by the least-squares trend of the series when it rises."""
    if not series:
        return 0.0
    last = series[-1]
    n = len(series)
    if n < 2:
        return last
    mean_x = (n - 1) / 2
    mean_y = sum(series) / n
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(series)) / sum((i - mean_x) ** 2 for i in range(n))
    return last + max(0.0, slope)


class Planner:
    """Plans from successive observations. It remembers what the policy needs: recent demands (for the
    forecast), recent recommendations (for stabilization) and recent decode samples (for the step model)."""

    def __init__(self, slo: Slo, settings: Settings | None = None, step_model: StepModel | None = None,
                 prefill_tokens_per_s: float | None = None) -> None:
        self.slo = slo
        self.settings = settings or Settings()
        self.profile = step_model  # given: used instead of the fitted model
        self.prefill_rate = prefill_tokens_per_s  # given: used until a prefill rate is measured
        self.demands: dict[Role, collections.deque[float]] = {r: collections.deque(maxlen=64) for r in ROLES}
        self.recommended: collections.deque[tuple[float, dict[Role, int]]] = collections.deque(maxlen=4096)
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self.last_streams: tuple[float, float] | None = None  # (when, decode streams): their growth

    def use_profile(self, profile: Profile | None) -> None:
        """Capacity from a `triphase profile` (None: from what the workers report): decode step times
        instead of the fitted model, and a prefill rate until Prometheus has measured one."""
        self.profile = StepModel.from_profile(profile) if profile is not None else None
        self.prefill_rate = profile.prefill_tokens_per_s() if profile is not None else None

    # ---- demand
    def step_model(self) -> StepModel | None:
        return self.profile or fit_step_model(list(self.samples))

    def prefill_demand(self, signals: Signals) -> float | None:
        rate = signals.prefill_tokens_per_s or self.prefill_rate
        arriving = (signals.prefill_tokens_rate or 0.0) + (signals.queued_prefill_tokens or 0.0) / self.slo.ttft_s
        if not rate:  # no prefill measured yet: nothing arriving is no demand, otherwise unknown
            return 0.0 if arriving == 0 else None
        return arriving / (rate * self.settings.prefill_utilization)

    def encode_demand(self, signals: Signals) -> float | None:
        """Encode workers' worth of work: images arriving times the time one takes, plus the queue
        worked off within the TTFT target (an image waits before its prefill can start)."""
        arriving, queued = signals.image_rate or 0.0, signals.queued_images or 0.0
        if not signals.encode_s:  # nothing encoded yet: no images is no demand, otherwise unknown
            return 0.0 if arriving == 0 and queued == 0 else None
        return (arriving + queued / self.slo.ttft_s) * signals.encode_s

    def decode_demand(self, signals: Signals, now: float = 0.0) -> float | None:
        streams = signals.streams
        previous, self.last_streams = self.last_streams, (now, streams)
        if streams == 0:
            return 0.0
        model = self.step_model()
        if model is None:
            return None
        per_worker = model.streams_within(self.slo.tpot_s)
        kv_per_stream = [s.kv_usage / s.streams for s in signals.decode if s.streams > 0 and s.kv_usage > 0]
        if kv_per_stream:
            per_worker = min(per_worker, self.settings.kv_high / (sum(kv_per_stream) / len(kv_per_stream)))
        if per_worker <= 0:
            return math.inf
        served, finished = signals.generation_tokens_rate, signals.request_rate
        if not served or not finished:  # nothing streamed or finished in the window: count streams
            return streams / per_worker
        # Tokens wanted per second: those streamed, plus what streams piling up will want (growth in
        # streams per second times the tokens a request takes). Under overload the stream count
        # inflates (every stream is slower) and the streamed tokens saturate; this is neither.
        growth = 0.0
        if previous is not None and now > previous[0]:
            growth = max(0.0, (streams - previous[1]) / (now - previous[0]))
        wanted = served + growth * served / finished
        # One worker streams per_worker / TPOT tokens a second. The stream count bounds the result: just
        # after a shift few requests have finished, tokens per request look huge and so would the growth.
        return min(wanted * self.slo.tpot_s / per_worker, streams / per_worker)

    # ---- the plan
    def plan(self, now: float, signals: Signals | None, pools: Mapping[Role, PoolView],
             by_role: Mapping[Role, int] | None = None) -> Plan:
        """`pools`: the pools there are (prefill, decode, and encode if the deployment has one); `by_role`:
        ready workers by the role they serve now (the balancer's split; defaults to each pool's ready
        count). An encode pool is sized by its throughput (`encode_demand`) and never joins the split."""
        s = self.settings
        current = {role: pool.replicas for role, pool in pools.items()}
        if signals is None:
            return Plan(current, (), "no metrics from Prometheus: nothing changes", held="no-metrics")
        for sample in signals.decode:
            if sample.streams > 0 and sample.step_s > 0:
                self.samples.append((sample.streams, sample.step_s))
        demand = {Role.PREFILL: self.prefill_demand(signals), Role.DECODE: self.decode_demand(signals, now),
                  Role.ENCODE: self.encode_demand(signals)}
        for role, value in demand.items():
            if value is not None and math.isfinite(value):
                self.demands[role].append(value)
        serving = dict(by_role) if by_role is not None else {role: pool.ready for role, pool in pools.items()}

        wanted: dict[Role, int] = {}
        reasons: dict[Role, str] = {}
        predicted: dict[Role, float] = {}
        for role in pools:
            n = serving.get(role, 0)
            if signals.idle:
                wanted[role], reasons[role] = pools[role].min_replicas, "idle"
                continue
            want, why = n, "steady"
            value = demand.get(role)
            if s.throughput_mode and value is not None:
                series = list(self.demands[role])[-s.forecast_points:] if math.isfinite(value) else [value]
                predicted[role] = forecast(series)
                if math.isfinite(predicted[role]):
                    want, why = math.ceil(predicted[role] / s.target_utilization - 1e-9), "throughput"
                else:
                    want, why = n + 1, "throughput"
            if s.load_mode and role in SWITCHED:  # an encode pool is sized by its throughput only
                percentile, target, name = ((signals.ttft_s, self.slo.ttft_s, "ttft-slo") if role is Role.PREFILL
                                            else (signals.tpot_s, self.slo.tpot_s, "tpot-slo"))
                if percentile is not None and percentile > target:
                    if want <= n:
                        want, why = n + 1, name
                else:
                    met = percentile is None or percentile <= s.down_slo_fraction * target
                    can_shrink = met and n > 1 and value is not None and value / (n - 1) <= s.target_utilization
                    if not s.throughput_mode and can_shrink:
                        want, why = n - 1, "load"
                    elif want < n and not can_shrink:
                        want, why = n, "steady"
            wanted[role], reasons[role] = want, why

        targets = dict(wanted)
        if s.role_switching:
            switched = {role: n for role, n in wanted.items() if role in SWITCHED}
            targets.update(self._by_pools(switched, serving, {r: p for r, p in pools.items() if r in SWITCHED}))
        targets = {role: min(max(v, pools[role].min_replicas), pools[role].max_replicas)
                   for role, v in targets.items()}
        self.recommended.append((now, targets))
        while self.recommended and now - self.recommended[0][0] > s.stabilization_s:
            self.recommended.popleft()

        if any(pool.pending for pool in pools.values()):
            waiting = ", ".join(f"{r} {p.ready}/{p.replicas}" for r, p in pools.items() if p.pending)
            return Plan(current, (), f"waiting for the last change to be Ready ({waiting})", predicted,
                        held="pending")
        changes = []
        held = ""
        for role, pool in pools.items():
            target = targets[role]
            if target < pool.replicas:  # down only as far as every recommendation in the window allows
                stable = max(r.get(role, target) for _, r in self.recommended)
                if stable > target:
                    held = "stabilizing"
                target = min(pool.replicas, stable)
            if target != pool.replicas:
                reason = reasons.get(role, "steady")
                if target == pool.min_replicas and wanted.get(role, target) < target:
                    reason = "min"
                elif target == pool.max_replicas and wanted.get(role, target) > target:
                    reason = "max"
                elif s.role_switching and reason == "steady":
                    reason = next((reasons[r] for r in reasons if reasons[r] != "steady"), "throughput")
                changes.append(Change(role, pool.replicas, target, reason))
        replicas = {**current, **{c.role: c.to_replicas for c in changes}}
        why = "; ".join(f"{c.role} {c.from_replicas} -> {c.to_replicas} ({c.reason})" for c in changes)
        if not why:
            why = "within the stabilization window: no decrease yet" if held else "pools are sized for the demand"
        return Plan(replicas, tuple(changes), why, predicted, held=held)

    @staticmethod
    def _by_pools(wanted: Mapping[Role, int], serving: Mapping[Role, int], pools: Mapping[Role, PoolView],
                  ) -> dict[Role, int]:
        """Per-role workers wanted → pool replicas, keeping the balancer's split: only the total changes,
        added to the pool of the role short of workers, removed from the pool of the role with spare."""
        delta = {role: wanted[role] - serving.get(role, 0) for role in wanted}
        net = sum(delta.values())
        targets = {role: pool.replicas for role, pool in pools.items()}
        if net > 0:
            for role in sorted(delta, key=lambda r: -delta[r]):
                add = min(net, max(0, delta[role]))
                targets[role] += add
                net -= add
        elif net < 0:
            remove = -net
            for role in sorted((r for r in delta if delta[r] < 0), key=lambda r: delta[r]):
                take = min(remove, -delta[role])
                for pool in (role, *(r for r in targets if r != role)):  # its own pool first; a switched
                    step = max(0, min(take, targets[pool] - pools[pool].min_replicas))  # worker is in the other
                    targets[pool] -= step
                    take -= step
                    remove -= step
        return targets
