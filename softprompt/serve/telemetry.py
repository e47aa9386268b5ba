"""The server's Prometheus metrics, in a registry of its own (no global state: two servers in one
process, as in the tests, keep separate counts)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("softprompt_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.rows = Counter("softprompt_rows", "rows answered", ["task", "kind"], registry=r)
        self.latency = Histogram(
            "softprompt_request_seconds", "time from request to answer", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "softprompt_queue_wait_seconds", "time a request waited before its batch ran", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "softprompt_batch_rows", "rows per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_tasks = Histogram(
            "softprompt_batch_tasks", "distinct tasks per batch", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r
        )
        self.queue_rows = Gauge("softprompt_queue_rows", "rows waiting for a batch", registry=r)
        self.tasks_loaded = Gauge("softprompt_tasks_loaded", "tasks loaded", registry=r)
        self.cache_hits = Gauge("softprompt_prefix_cache_hits", "prefix cache hits since start", registry=r)
        self.cache_misses = Gauge("softprompt_prefix_cache_misses", "prefix cache misses since start", registry=r)
        self.cache_bytes = Gauge("softprompt_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)


class Measured:
    """ASGI middleware: counts each answer by route and status, and times it to its first byte."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "other")  # its template; set by the router
                self.telemetry.requests.labels(route, str(message["status"])).inc()
                self.telemetry.latency.labels(route).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, timed)
