"""``GET /metrics``: the server's Prometheus metrics (``prometheus_client``).

One registry per application, so several servers in one process (tests) do not mix
their counts. Names follow vLLM's where one exists (``vllm:`` there, ``mote:`` here).
"""

from __future__ import annotations

from typing import Any


class ServerMetrics:
    def __init__(self, queue_depth: Any = None) -> None:
        from importlib.util import find_spec

        if find_spec("prometheus_client") is None:
            raise ImportError(
                "axolotl-mote serve needs prometheus_client for /metrics: "
                'pip install "axolotl-mote[serve]"'
            )
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "mote:requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=reg,
        )
        self.queue = Gauge(
            "mote:num_requests_waiting", "Requests queued for the model", registry=reg
        )
        if queue_depth is not None:
            self.queue.set_function(queue_depth)
        self.batch_size = Histogram(
            "mote:batch_size",
            "Chat requests per generate_chains batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=reg,
        )
        self.prompt_tokens = Counter(
            "mote:prompt_tokens", "Prompt tokens processed", registry=reg
        )
        self.generation_tokens = Counter(
            "mote:generation_tokens", "Tokens generated", registry=reg
        )
        self.latency = Histogram(
            "mote:e2e_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=reg,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
