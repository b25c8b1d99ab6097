"""Prometheus metrics through Ray's metrics export (scraped from each node's metrics port,
names prefixed `ray_` by Ray). Request-level ones are recorded by the router, engine-level ones
(queue depth, KV-cache use, per-expert load) by each pool replica."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_ITL = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]


class RouterMetrics:
    """Per request, by pool and route. requests_total's `status` is the HTTP code the request got
    (gRPC's maps to it: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503
    UNAVAILABLE), 500 for an unexpected failure mid-stream, or `cancelled` when the client left;
    requests refused before a pool was chosen have pool `none`."""

    def __init__(self) -> None:
        tags = ("pool", "route")
        self.requests = Counter("q3serve_requests_total", "Requests by pool, route and status.", tag_keys=(*tags, "status"))
        self.latency = Histogram("q3serve_request_latency_seconds", "End-to-end request latency.", _LATENCY, tag_keys=tags)
        self.ttft = Histogram("q3serve_time_to_first_token_seconds", "Time to first token.", _LATENCY, tag_keys=tags)
        self.itl = Histogram("q3serve_inter_token_latency_seconds", "Time between streamed chunks.", _ITL, tag_keys=tags)
        self.tokens_in = Counter("q3serve_prompt_tokens_total", "Prompt tokens.", tag_keys=tags)
        self.tokens_out = Counter("q3serve_generation_tokens_total", "Generated tokens.", tag_keys=tags)
        # over q3serve_prompt_tokens_total: the prefix-cache hit rate (as vLLM's hits over queries)
        self.tokens_cached = Counter("q3serve_prompt_cached_tokens_total",
                                     "Prompt tokens served from the prefix cache.", tag_keys=tags)
        self.retries = Counter("q3serve_request_retries_total",
                               "Starts retried after a replica failed before the first token.", tag_keys=tags)


class PoolMetrics:
    def __init__(self) -> None:
        self.queue = Gauge("q3serve_queue_depth", "Sequences waiting for admission.", tag_keys=("pool",))
        self.running = Gauge("q3serve_running_sequences", "Sequences being generated.", tag_keys=("pool",))
        self.kv_usage = Gauge("q3serve_kv_cache_usage_ratio", "Fraction of KV blocks in use.", tag_keys=("pool",))
        self.expert_load = Gauge("q3serve_expert_tokens", "Tokens routed to each expert since start.",
                                 tag_keys=("pool", "layer", "expert"))
        self.expert_weight = Gauge("q3serve_expert_routing_weight",
                                   "Summed routing weight of the tokens routed to each expert since start.",
                                   tag_keys=("pool", "layer", "expert"))
