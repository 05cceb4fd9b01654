"""Worker metrics, read from the engine's stats snapshot at scrape time (no bookkeeping of its own).

Served by prometheus-client's HTTP server on `--metrics-port`; documented in docs/metrics.md."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from triphase.workers.server import WorkerServicer


class WorkerCollector(Collector):
    def __init__(self, servicer: WorkerServicer) -> None:
        self.servicer = servicer

    def collect(self) -> Iterator[Metric]:
        sv = self.servicer
        s = sv.engine.stats
        labels = ["model", "worker", "role"]
        values = [sv.model, sv.worker_id, str(sv.role)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            return family

        engine = sv.engine.engine
        info = GaugeMetricFamily("triphase_worker_info", "Where and how the worker computes (always 1)",
                                 labels=[*labels, "device", "dtype", "nixl"])
        info.add_metric([*values, str(engine.device), engine.layout.dtype,
                         sv.nixl.memory if sv.nixl is not None else "off"], 1)
        yield info
        yield gauge("triphase_worker_running_requests", "Requests being computed", s.running)
        yield gauge("triphase_worker_waiting_requests", "Requests queued for admission", s.waiting)
        yield gauge("triphase_worker_pinned_requests", "Prefilled requests whose KV awaits a decode worker",
                    s.pinned)
        yield gauge("triphase_kv_cache_usage_ratio", "Share of KV blocks in use (not free)",
                    1 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0)
        yield gauge("triphase_worker_queued_prefill_tokens", "Prompt tokens waiting to be prefilled",
                    s.queued_prefill_tokens)
        yield gauge("triphase_worker_draining", "1 while the worker refuses new work", float(sv.draining))
        yield gauge("triphase_worker_prefill_tokens_per_second", "Prompt tokens per second of recent prefill steps",
                    s.prefill_tokens_per_s)
        yield gauge("triphase_worker_decode_step_seconds", "Mean duration of recent decode steps", s.decode_step_s)
        yield counter("triphase_worker_prefill_tokens", "Prompt tokens computed", s.prefill_tokens_total)
        yield counter("triphase_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      s.prefix_queries)
        yield counter("triphase_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_hits)
        yield counter("triphase_preemptions", "Requests preempted (KV freed, recomputed later)", s.preemptions)
        yield counter("triphase_moe_routed_tokens", "Token-to-expert assignments computed by sparse layers",
                      s.moe_routed_tokens)
        yield counter("triphase_moe_active_experts", "Experts given at least one token, per sparse layer and step",
                      s.moe_active_experts)
        received = CounterMetricFamily("triphase_kv_received_bytes", "KV bytes pulled from prefill workers",
                                       labels=[*labels, "backend"])
        for backend, count in sv.handoff.bytes_received.items():
            received.add_metric([*values, backend], count)
        yield received
        yield counter("triphase_kv_nixl_fallbacks", "NIXL transfers that fell back to the gRPC stream",
                      sv.handoff.nixl_fallbacks)
        images = sv.images.counters
        yield gauge("triphase_encode_queued_images", "Images being decoded or encoded here, or waiting to be",
                    images.queued)
        yield counter("triphase_encode_images", "Images this worker encoded into embeddings", images.encoded)
        yield counter("triphase_encode_seconds", "Seconds spent decoding and encoding images", images.encode_seconds)
        yield counter("triphase_encode_cache_hits", "Images whose embeddings were already cached here",
                      images.cache_hits)
        yield counter("triphase_encode_cache_misses", "Images whose embeddings had to be encoded or read",
                      images.cache_misses)
        moved = CounterMetricFamily("triphase_embedding_bytes", "Image embedding bytes moved between workers",
                                    labels=[*labels, "direction", "backend"])
        for backend, count in images.received_bytes.items():
            moved.add_metric([*values, "received", backend], count)
        moved.add_metric([*values, "sent", "grpc"], images.sent_bytes)
        yield moved


def serve_metrics(servicer: WorkerServicer, host: str, port: int) -> int:
    """Start the metrics HTTP server (a daemon thread); returns the bound port."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(servicer))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
