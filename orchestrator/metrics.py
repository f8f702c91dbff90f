"""Prometheus metrics of a running ``folio run`` (``--metrics-port``).

Each run gets its own registry, served by prometheus-client's HTTP server (bound to
127.0.0.1 unless told otherwise). Counters move as pages are written; gauges that
describe the moment (queue depths, pages/s, recogniser retries) are read when scraped.

Series (all prefixed ``folio_``): ``pages_total{status}``, ``pages_skipped_total`` (already
done), ``regions_total``, ``lines_total``, ``stage_seconds_total{stage}`` (wall seconds
summed over pages), ``pages_per_second``, ``queue_depth{queue}``,
``recognizer_retries_total``, and for vLLM regions the histograms ``vllm_ttft_seconds``,
``vllm_tpot_seconds`` and ``vllm_request_seconds``.

Usage::

    metrics = RunMetrics()
    server = metrics.serve(9400)                 # http://127.0.0.1:9400/metrics
    pipeline.run(sources, db, on_page=metrics.page, on_skip=metrics.skipped)
    metrics.watch(pipeline)                      # queue depths, retries
    server.shutdown()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from orchestrator.errors import ConfigError
from orchestrator.types import PageOutcome, PageRef

# Latency buckets (seconds) for VLM requests: from a short line to a dense table page.
VLLM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)


class RunMetrics:
    """The metrics of one run; ``page``/``skipped`` are the pipeline's callbacks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pages = Counter("folio_pages", "Pages written, by status", ["status"], registry=r)
        self.skipped_pages = Counter("folio_pages_skipped", "Pages skipped as already done",
                                     registry=r)
        self.regions = Counter("folio_regions", "Regions written", registry=r)
        self.lines = Counter("folio_lines", "Text lines written", registry=r)
        self.stage_seconds = Counter("folio_stage_seconds",
                                     "Wall seconds each stage spent on pages, summed over pages",
                                     ["stage"], registry=r)
        self.ttft = Histogram("folio_vllm_ttft_seconds", "vLLM time to first token per region",
                              buckets=VLLM_BUCKETS, registry=r)
        self.tpot = Histogram("folio_vllm_tpot_seconds", "vLLM time per output token per region",
                              buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("folio_vllm_request_seconds", "vLLM request latency per region",
                                 buckets=VLLM_BUCKETS, registry=r)
        self._ok = 0
        self._start = time.monotonic()
        self._lock = threading.Lock()
        rate = Gauge("folio_pages_per_second", "Pages written ok per second since the start",
                     registry=r)
        rate.set_function(self._rate)
        self._queues = Gauge("folio_queue_depth", "Items waiting in each queue between stages",
                             ["queue"], registry=r)
        self._retries = Gauge("folio_recognizer_retries_total",
                              "Requests the recogniser retried", registry=r)

    def _rate(self) -> float:
        with self._lock:
            elapsed = time.monotonic() - self._start
            return self._ok / elapsed if elapsed > 0 else 0.0

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the server."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                              ) from exc
        return server

    def page(self, outcome: PageOutcome) -> None:
        self.pages.labels(status=outcome.status).inc()
        if outcome.status == "ok":
            with self._lock:
                self._ok += 1
        self.regions.inc(len(outcome.regions))
        for key, seconds in outcome.timings.items():
            self.stage_seconds.labels(stage=key.removesuffix("_s")).inc(max(0.0, seconds))
        for _, result in outcome.regions:
            if result is None:
                continue
            self.lines.inc(len(result.lines))
            stats = result.stats
            for name, histogram in (("ttft_s", self.ttft), ("tpot_s", self.tpot)):
                value = stats.get(name)
                if isinstance(value, int | float):
                    histogram.observe(value)
            if isinstance(stats.get("ttft_s"), int | float) and isinstance(
                    stats.get("latency_s"), int | float):
                self.latency.observe(stats["latency_s"])

    def skipped(self, ref: PageRef) -> None:
        self.skipped_pages.inc()

    def watch(self, queue_depths: Callable[[], dict[str, int]],
              recognizer_metrics: Callable[[], dict[str, Any]] | None) -> None:
        """Read queue depths and the recogniser's retry count when scraped."""
        for name in queue_depths():
            self._queues.labels(queue=name).set_function(_depth_of(queue_depths, name))
        if recognizer_metrics is not None:
            read = recognizer_metrics

            def retries() -> float:
                return float(read().get("retries", 0) or 0)

            self._retries.set_function(retries)


def _depth_of(queue_depths: Callable[[], dict[str, int]], name: str) -> Callable[[], float]:
    def depth() -> float:
        return float(queue_depths().get(name, 0))
    return depth
