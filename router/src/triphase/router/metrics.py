"""Router metrics (prometheus-client, base units, `model` label). Documented in docs/metrics.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
WORKER_STATES = ("ready", "draining", "unhealthy")  # triphase_workers{state}; every role x state is exported
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


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
        self.requests = Counter("triphase_requests_total", "Finished requests by outcome", ["model", "status"],
                                registry=r)
        self.prompt_tokens = Counter("triphase_prompt_tokens_total", "Prompt tokens processed", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("triphase_generation_tokens_total", "Tokens generated", ["model"],
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
        self.rebalanced = Counter("triphase_streams_rebalanced_total", "Running streams a crowded decode worker "
                                  "handed over to be resumed on a less loaded one", ["model"], registry=r)
        # Every series that needs no more than the model exists from the start, at 0: a rate over it
        # is 0 rather than no data, so alerts and dashboards tell "none happened" from "not scraped".
        for family in (self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens, self.migrations,
                       self.rebalanced):
            family.labels(model)
        self.requests.labels(model, "ok")
