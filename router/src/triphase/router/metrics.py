"""Router metrics (prometheus-client, base units, `model` label). Documented in docs/metrics.md.

The one place the router's series are defined and written: routes, the pipeline and the stream
balancer report what happened through the methods below and never touch a family themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from triphase.common.roles import Role

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
WORKER_STATES = ("ready", "draining", "unhealthy")  # triphase_workers{state}; every role x state is exported
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


# The status of a request whose client hung up mid-stream (nginx's and Envoy's convention): neither ok
# nor an error of the serving system, so outside the error budget and the error panels.
CLIENT_CLOSED = "499"

class RouterMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("triphase_request_ttft_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("triphase_request_tpot_seconds", "Mean time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("triphase_request_e2e_seconds", "Request latency, arrival to last token", ["model"],
                             buckets=E2E_BUCKETS, registry=r)
        # `key`: the name of the client's API key (never the key), "" when the API has no keys
        self.requests = Counter("triphase_requests_total", "Finished requests by outcome", ["model", "status", "key"],
                                registry=r)
        self.prompt_tokens = Counter("triphase_prompt_tokens_total", "Prompt tokens processed", ["model", "key"],
                                     registry=r)
        self.generation_tokens = Counter("triphase_generation_tokens_total", "Tokens generated", ["model", "key"],
                                         registry=r)
        self.kv_transfer_seconds = Histogram("triphase_kv_transfer_seconds",
                                             "Prefill end to first decode token (KV hand-off)", ["model", "backend"],
                                             buckets=TTFT_BUCKETS, registry=r)
        self.kv_transfer_bytes = Counter("triphase_kv_transfer_bytes_total", "KV bytes handed off",
                                         ["model", "backend"], registry=r)
        self.workers = Gauge("triphase_workers", "Workers by role and state", ["model", "role", "state"], registry=r)
        self.queue_depth = Gauge("triphase_queue_depth", "Requests in the router by stage", ["model", "role"],
                                 registry=r)
        self.migrations = Counter("triphase_request_migrations_total", "Requests resumed on another worker",
                                  ["model"], registry=r)
        self.encode_seconds = Histogram("triphase_image_encode_seconds", "A request's images encoded on the "
                                        "encode pool, start to last done", ["model"], buckets=TTFT_BUCKETS,
                                        registry=r)
        self.images = Counter("triphase_images_total", "Images in requests, by where they were encoded",
                              ["model", "where"], registry=r)
        self.rebalanced = Counter("triphase_streams_rebalanced_total", "Running streams a crowded decode worker "
                                  "handed over to be resumed on a less loaded one", ["model"], registry=r)
        # Every series that needs no more than the model exists from the start, at 0: a rate over it
        # is 0 rather than no data, so alerts and dashboards tell "none happened" from "not scraped".
        for family in (self.ttft, self.tpot, self.e2e, self.migrations, self.rebalanced):
            family.labels(model)
        for family in (self.prompt_tokens, self.generation_tokens):
            family.labels(model, "")
        self.requests.labels(model, "ok", "")
        for where in ("encode_pool", "prefill_worker"):
            self.images.labels(model, where)
        # The series every request writes, looked up once: labels() costs more than the write itself.
        self._ttft, self._tpot, self._e2e = (family.labels(model) for family in (self.ttft, self.tpot, self.e2e))
        self._outcomes: dict[tuple[str, str], Any] = {}  # (status, key): its triphase_requests_total
        self._tokens: dict[str, tuple[Any, Any]] = {}  # key: its prompt and generation token counters

    def first_token(self, seconds: float) -> None:
        """Arrival to the first token leaving the router."""
        self._ttft.observe(seconds)

    def finished(self, status: str, prompt_tokens: int, generated: int, seconds: float,
                 after_first_s: float | None, key: str = "") -> None:
        """A request the router ran ended: `status` ok, 400, 499 (the client hung up), 503...;
        `after_first_s` is the time from its first token to its last (None without a first token): its
        TPOT when it streamed more than one (kept for a request whose client hung up: slow tokens are a
        reason to). `key`: the name of the client's API key."""
        self._outcome(status, key).inc()
        tokens = self._tokens.get(key)
        if tokens is None:
            tokens = self._tokens[key] = (self.prompt_tokens.labels(self.model, key),
                                          self.generation_tokens.labels(self.model, key))
        tokens[0].inc(prompt_tokens)
        tokens[1].inc(generated)
        if status != CLIENT_CLOSED:  # it did not end: the time until its client left is no end-to-end latency
            self._e2e.observe(seconds)
        if after_first_s is not None and generated > 1:
            self._tpot.observe(after_first_s / (generated - 1))

    def refused(self, status: int, key: str = "") -> None:
        """A request answered with an error before or instead of running (4xx, 429, 500...)."""
        self._outcome(str(status), key).inc()

    def _outcome(self, status: str, key: str) -> Any:
        counter = self._outcomes.get((status, key))
        if counter is None:
            counter = self._outcomes[(status, key)] = self.requests.labels(self.model, status, key)
        return counter

    def images_encoded(self, seconds: float | None, on_pool: int, on_prefill: int) -> None:
        """A request's images: how many the encode pool encoded (in `seconds`, when it did) and how many
        are left to the prefill worker (no encode pool, or it failed)."""
        if seconds is not None:
            self.encode_seconds.labels(self.model).observe(seconds)
        self.images.labels(self.model, "encode_pool").inc(on_pool)
        self.images.labels(self.model, "prefill_worker").inc(on_prefill)

    def migrated(self) -> None:
        self.migrations.labels(self.model).inc()

    def streams_rebalanced(self, moved: int) -> None:
        self.rebalanced.labels(self.model).inc(moved)

    def kv_handoff(self, backend: str, seconds: float, nbytes: int) -> None:
        """End of prefill to the decode worker's first token, and the KV bytes it read."""
        self.kv_transfer_seconds.labels(self.model, backend).observe(seconds)
        self.kv_transfer_bytes.labels(self.model, backend).inc(nbytes)

    def workers_seen(self, workers: Sequence[tuple[Role, str, int]], queued: int) -> None:
        """The registry at scrape time: (role, state, waiting requests) per worker, and the admission queue.
        Every role x state is exported, zeros too: an alert on "no ready decode worker" needs a series
        that is 0, not one that is gone."""
        counts = {(str(role), state): 0 for role in Role for state in WORKER_STATES}
        for role, state, _ in workers:
            counts[str(role), state] += 1
        self.workers.clear()
        for (role_name, state), n in counts.items():
            self.workers.labels(self.model, role_name, state).set(n)
        self.queue_depth.clear()
        self.queue_depth.labels(self.model, "router").set(queued)
        for role, _, waiting in workers:  # requests waiting inside the workers, by role
            self.queue_depth.labels(self.model, str(role)).inc(waiting)
