"""Reading the planner's signals: attainment from histogram buckets, and a Prometheus that is not there."""

from __future__ import annotations

import math

import pytest

from triphase.common.process.net import free_port
from triphase.control.balancer import Slo
from triphase.control.signals import MetricsUnavailable, PrometheusSignals, http_query, share_within

BUCKETS = [(0.5, 10.0), (1.0, 30.0), (2.0, 90.0), (math.inf, 100.0)]  # cumulative, 100 observations


@pytest.mark.parametrize("target, share", [
    (0.25, 0.05),  # half of the first bucket (from 0)
    (1.0, 0.30),  # exactly a bound
    (1.5, 0.60),  # halfway through (1, 2]: 30 + 30
    (2.0, 0.90),
    (30.0, 0.90),  # beyond the last finite bound nothing more is known to be under it
])
def test_the_share_under_a_target_interpolates_inside_its_bucket(target: float, share: float) -> None:
    assert share_within(BUCKETS, target) == pytest.approx(share)


def test_no_observations_is_no_share() -> None:
    assert share_within([], 1.0) is None
    assert share_within([(1.0, 0.0), (math.inf, 0.0)], 1.0) is None


def test_an_unreachable_prometheus_is_metrics_unavailable() -> None:
    reader = PrometheusSignals(http_query(f"http://127.0.0.1:{free_port()}", timeout_s=2), "", Slo(1.0, 0.1), 90, 60)
    with pytest.raises(MetricsUnavailable, match="unreachable"):
        reader.read()


def test_a_deployment_prometheus_does_not_scrape_is_metrics_unavailable() -> None:
    def empty(expr: str) -> list[dict[str, object]]:
        return []  # what Prometheus answers for series it has never seen

    reader = PrometheusSignals(empty, 'namespace="x"', Slo(1.0, 0.1), 90, 60)
    with pytest.raises(MetricsUnavailable, match="no worker series"):
        reader.read()


def test_an_oversized_answer_is_refused_before_it_is_parsed() -> None:
    import http.server
    import threading

    from triphase.control import signals

    class Huge(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[" + b"0," * (signals.MAX_ANSWER_BYTES // 2 + 8) + b"0]")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Huge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MetricsUnavailable, match="answered more than"):
            http_query(f"http://127.0.0.1:{server.server_port}")("up")
    finally:
        server.shutdown()
        server.server_close()
