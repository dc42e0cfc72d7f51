"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Every label value comes from the server (endpoint names, status codes, error codes, run
and group names), never from a request, so a client cannot grow the label sets.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests, errors by kind, latency, batch sizes, queue depth, generated tokens."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loracli_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("loracli_errors", "Requests refused or failed, by kind", ["kind"], registry=r)
        self.latency = Histogram("loracli_request_latency_seconds", "Time from request to the end of the answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_requests = Counter("loracli_model_requests", "Requests that reached a run", ["model"], registry=r)
        self.batch_size = Histogram("loracli_batch_size", "Rows per forward (classification) or per generation batch",
                                    ["group"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("loracli_queue_depth", "Rows waiting for a batch", ["group"], registry=r)
        self.in_flight = Gauge("loracli_requests_in_flight", "Requests being served", registry=r)
        self.tokens = Counter("loracli_generated_tokens", "Tokens generated", ["model"], registry=r)

    def observe_batch(self, group: str, size: int, waiting: int) -> None:
        self.batch_size.labels(group).observe(size)
        self.queue_depth.labels(group).set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
