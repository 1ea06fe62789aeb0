"""Prometheus metrics of the gateway, on a registry of its own (no process-global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


_PREFIX_GAUGES = {
    "query_tokens": "Prompt tokens looked up in the worker's prefix cache (since it started)",
    "hit_tokens": "Of those, tokens found cached",
    "query_blocks": "Reusable prompt blocks looked up",
    "hit_blocks": "Of those, blocks found cached",
    "evictions": "Cached blocks evicted to make room",
    "cached_blocks": "Blocks the prefix cache holds now",
}


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("pdserve_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.inflight = Gauge("pdserve_inflight_requests", "Requests being served by this gateway", registry=r)
        self.tokens = Counter("pdserve_tokens", "Tokens processed", ["kind"], registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.prefill = Histogram("pdserve_prefill_seconds", "Prefill compute time on the prefill worker",
                                 buckets=_LATENCY_BUCKETS_S, registry=r)
        self.worker_queue = Gauge("pdserve_worker_active_requests", "Requests active on each worker",
                                  ["worker_id", "role"], registry=r)
        self.prefix = {name: Gauge(f"pdserve_worker_prefix_{name}", help_, ["worker_id", "role"], registry=r)
                       for name, help_ in _PREFIX_GAUGES.items()}
        self.prefix_hit_rate = Gauge("pdserve_prefix_cache_hit_rate",
                                     "Cluster-wide prefix cache hit rate since the workers started", ["unit"],
                                     registry=r)
        self.prefix_index = Gauge("pdserve_router_prefix_index", "The router's prefix index size", ["kind"],
                                  registry=r)
        self.router_requests = Gauge("pdserve_router_requests", "The router's request counters since it started: "
                                     "routed, forwarded, rejected, migrated, failed, local_prefills", ["kind"],
                                     registry=r)
        self.iccache = Counter("pdserve_iccache_requests", "Requests for the routed model by the arm that took them "
                               "(large, or small with examples: an offload)", ["arm"], registry=r)
        self.workers_alive = Gauge("pdserve_workers_alive", "Live workers by role", ["role"], registry=r)
