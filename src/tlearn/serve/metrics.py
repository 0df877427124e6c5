"""Prometheus metrics of one server (its own registry, so that several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: dict[str, str]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tlearn_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("tlearn_request_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tlearn_queue_requests", "Requests admitted and not yet answered (decoding, waiting "
                                                        "or running)", registry=r)
        self.waiting_images = Gauge("tlearn_queue_images", "Images decoded and waiting for the engine", registry=r)
        self.batch_size = Histogram("tlearn_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("tlearn_batch_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.images = Counter("tlearn_images", "Images classified", registry=r)
        self.rejections = Counter("tlearn_rejections", "Requests refused, by the limit or check they broke",
                                  ["reason"], registry=r)
        Info("tlearn_model", "The model served", registry=r).info(model)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
