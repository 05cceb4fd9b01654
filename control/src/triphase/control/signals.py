"""What the planner reads from Prometheus: one deployment's `Signals` over a window, by PromQL over the
HTTP API (`/api/v1/query`, standard library only).

Series are selected by a label matcher: on Kubernetes `namespace="ns",triphase_dev_deployment="name"`
(the PodMonitor copies the pod label onto every target), locally whatever the scrape configuration set.

- request rate, tokens streamed: `rate()` of the router's counters over the window; prefill rate: of
  the workers' counter of prompt tokens computed (the router's prompt-token counter includes
  prefix-cache hits, which cost no prefill: a repeated prompt would look like hundreds of workers'
  worth of demand);
- TTFT and TPOT at the SLO percentile: `histogram_quantile` over the router's histograms;
- attainment: from the same histograms' buckets, the share of requests at or under each target
  (interpolated linearly inside the bucket the target falls in, as `histogram_quantile` does). The two
  histograms are separate, so the share meeting both is not known exactly: the lower bound
  1 - (missed TTFT share) - (missed TPOT share) is reported, never an optimistic figure;
- backlog, prefill rate, decode workers: the workers' gauges, by the role each reports now;
- images: the router's count of images arriving, the encode workers' seconds per image (the rate of
  their encode seconds over the rate of images they encoded) and the images queued on them.

`MetricsUnavailable` when Prometheus cannot be reached, answers an error, or has no worker series for
the selector (it does not scrape the deployment): the planner then changes nothing.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from triphase.control.balancer import Slo
from triphase.control.planner import DecodeSample, Signals

Query = Callable[[str], list[dict[str, Any]]]  # PromQL -> the instant vector's items
MAX_ANSWER_BYTES = 16 << 20  # an instant vector of one deployment's series is kilobytes


class MetricsUnavailable(Exception):
    """No usable answer from Prometheus (unreachable, an error, or no series for the deployment)."""


def http_query(base_url: str, timeout_s: float = 10.0) -> Query:
    """Instant queries against the Prometheus at `base_url` (http://host:port, optionally a path prefix)."""
    base = base_url.rstrip("/")

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            if len(raw) > MAX_ANSWER_BYTES:  # what the spec's URL answers is bounded before it is parsed
                raise MetricsUnavailable(f"prometheus at {base} answered more than {MAX_ANSWER_BYTES} bytes")
            body = json.loads(raw)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
            except ValueError:
                detail = exc.reason
            raise MetricsUnavailable(f"prometheus at {base} answered {exc.code}: {detail}") from None
        except (OSError, ValueError) as exc:  # refused, timed out, DNS, not JSON
            raise MetricsUnavailable(f"prometheus at {base} unreachable: {exc}") from None
        if body.get("status") != "success" or body.get("data", {}).get("resultType") != "vector":
            raise MetricsUnavailable(f"prometheus at {base}: {body.get('error', 'unexpected answer')}")
        return list(body["data"]["result"])

    return query


def _value(item: dict[str, Any]) -> float:
    return float(item["value"][1])


def _scalar(items: list[dict[str, Any]]) -> float | None:
    """The single value of an aggregated query; None for no data or NaN."""
    if not items:
        return None
    value = _value(items[0])
    return None if math.isnan(value) or math.isinf(value) else value


def share_within(buckets: list[tuple[float, float]], target: float) -> float | None:
    """Of the observations in cumulative `buckets` [(upper bound, count)], the share at or under
    `target`, interpolating inside its bucket. None without observations."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    below_le, below_count = 0.0, 0.0
    for le, count in buckets:
        if target <= le:
            if math.isinf(le):  # beyond the last finite bound: everything up to it counts, no more
                return below_count / total
            fraction = (target - below_le) / (le - below_le) if le > below_le else 1.0
            return (below_count + fraction * (count - below_count)) / total
        below_le, below_count = le, count
    return 1.0


class PrometheusSignals:
    """Reads `Signals` for one deployment. `selector`: label matchers without braces ('' for all)."""

    def __init__(self, query: Query, selector: str, slo: Slo, percentile: float, window_s: float) -> None:
        self.query = query
        self.selector = selector
        self.slo = slo
        self.percentile = percentile
        self.window = f"{max(1, round(window_s))}s"

    def _sel(self, *extra: str) -> str:
        return "{" + ",".join(m for m in (self.selector, *extra) if m) + "}"

    def _rate(self, metric: str, *matchers: str) -> float:
        return _scalar(self.query(f"sum(rate({metric}{self._sel(*matchers)}[{self.window}]))")) or 0.0

    def _quantile(self, metric: str) -> float | None:
        q = self.percentile / 100
        return _scalar(self.query(f"histogram_quantile({q:g}, sum by (le) (rate({metric}_bucket{self._sel()}"
                                  f"[{self.window}])))"))

    def _share(self, metric: str, target: float) -> float | None:
        items = self.query(f"sum by (le) (increase({metric}_bucket{self._sel()}[{self.window}]))")
        return share_within([(float(i["metric"]["le"]), _value(i)) for i in items], target)

    def _by_worker(self, metric: str, role: str) -> dict[str, float]:
        return {i["metric"].get("worker", ""): _value(i) for i in self.query(f"{metric}{self._sel(role)}")}

    def roles(self) -> dict[str, int]:
        """Workers by the role each reports now (the balancer's split), as Prometheus last scraped them."""
        return {str(i["metric"].get("role", "")): int(_value(i))
                for i in self.query(f"count by (role) (triphase_worker_running_requests{self._sel()})")}

    def read(self) -> Signals:
        workers = self.query(f"count by (model) (triphase_worker_running_requests{self._sel()})")
        if not workers:
            raise MetricsUnavailable(f"no worker series for {self._sel()}: is Prometheus scraping the deployment?")
        prefill = 'role=~"prefill|both"'
        rates = [v for v in self._by_worker("triphase_worker_prefill_tokens_per_second", prefill).values() if v > 0]
        decode = 'role=~"decode|both"'
        running = self._by_worker("triphase_worker_running_requests", decode)
        steps = self._by_worker("triphase_worker_decode_step_seconds", decode)
        kv = self._by_worker("triphase_kv_cache_usage_ratio", decode)
        ttft_share = self._share("triphase_request_ttft_seconds", self.slo.ttft_s)
        tpot_share = self._share("triphase_request_tpot_seconds", self.slo.tpot_s)
        encode_images = self._rate('triphase_encode_images_total', 'role="encode"')
        encode_s = self._rate('triphase_encode_seconds_total', 'role="encode"') / encode_images \
            if encode_images else None
        attainment = None
        if ttft_share is not None:
            attainment = max(0.0, ttft_share - (1 - tpot_share if tpot_share is not None else 0.0))
        return Signals(
            request_rate=self._rate("triphase_requests_total"),
            generation_tokens_rate=self._rate("triphase_generation_tokens_total"),
            prefill_tokens_rate=self._rate("triphase_worker_prefill_tokens_total"),
            ttft_s=self._quantile("triphase_request_ttft_seconds"),
            tpot_s=self._quantile("triphase_request_tpot_seconds"),
            queued_prefill_tokens=sum(self._by_worker("triphase_worker_queued_prefill_tokens", prefill).values()),
            prefill_tokens_per_s=sum(rates) / len(rates) if rates else None,
            decode=tuple(DecodeSample(running[w], steps.get(w, 0.0), kv.get(w, 0.0)) for w in sorted(running)),
            attainment=attainment,
            model=str(workers[0]["metric"].get("model", "")),
            image_rate=self._rate("triphase_images_total"),
            encode_s=encode_s,
            queued_images=sum(self._by_worker("triphase_encode_queued_images", 'role="encode"').values()),
        )
