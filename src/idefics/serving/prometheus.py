"""The server's `/metrics`: Prometheus text from the engine's counters plus latency histograms of finished requests.

Counters and gauges are read from `engine.stats()` at scrape time (the engine is their one source of truth);
the histograms observe each finished choice's timings (TTFT, end-to-end, queue time) and each gap between two
tokens as the server receives them. Every app has its own registry, so several can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .events import FinishEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60)
# the engine's stats() keys -> (metric name, help); counters get "_total" appended by prometheus_client
GAUGES = {
    "running": ("idefics_requests_running", "Requests in decode slots."),
    "waiting": ("idefics_requests_waiting", "Requests waiting for a slot."),
    "slots_used": ("idefics_slots_used", "Decode slots in use."),
    "slots_total": ("idefics_slots_total", "Decode slots (--max-batch-size)."),
    "cache_bytes": ("idefics_cache_bytes", "Bytes of the preallocated KV and image caches."),
}
COUNTERS = {
    "prompt_tokens_total": ("idefics_prompt_tokens", "Prompt tokens prefilled."),
    "generation_tokens_total": ("idefics_generation_tokens", "Tokens generated."),
}


class EngineCollector(Collector):
    """Reads `stats()` (the engine's) on every scrape."""

    def __init__(self, stats: Callable[[], dict], *, model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        stats = self.stats()
        labels = ["model_name"]
        for key, (name, doc) in GAUGES.items():
            if key in stats:
                yield _family(GaugeMetricFamily, name, doc, labels, [self.model_name], stats[key])
        if stats.get("slots_total"):
            usage = stats.get("slots_used", 0) / stats["slots_total"]
            yield _family(GaugeMetricFamily, "idefics_slot_usage_ratio", "Slots used / slots.", labels,
                          [self.model_name], usage)  # fmt: skip
        for key, (name, doc) in COUNTERS.items():
            if key in stats:
                yield _family(CounterMetricFamily, name, doc, labels, [self.model_name], stats[key])
        finished = CounterMetricFamily(
            "idefics_request_success", "Finished choices by finish reason.", labels=["model_name", "finish_reason"]
        )
        for reason, count in sorted(stats.get("finished_total", {}).items()):
            finished.add_metric([self.model_name, reason], count)
        yield finished
        constrained = CounterMetricFamily("idefics_constrained_requests", "Requests with a structured-output "
                                          "constraint, by kind.", labels=["model_name", "kind"])  # fmt: skip
        for kind, count in sorted(stats.get("constrained_total", {}).items()):
            constrained.add_metric([self.model_name, kind], count)
        yield constrained
        for cache, what in (("image_cache", "image cache (encoded images)"), ("prefix_cache", "prefix cache")):
            counts = stats.get(cache)
            if counts is None:
                continue
            for key in ("hits", "misses", "evictions"):
                yield _family(CounterMetricFamily, f"idefics_{cache}_{key}", f"{key.capitalize()} of the {what}.",
                              labels, [self.model_name], counts[key])  # fmt: skip
            yield _family(GaugeMetricFamily, f"idefics_{cache}_bytes", f"Bytes the {what} holds.", labels,
                          [self.model_name], counts["bytes"])  # fmt: skip
        if "prefix_cache" in stats:
            yield _family(
                CounterMetricFamily,
                "idefics_prefix_cache_tokens_reused",
                "Prompt tokens not prefilled: reused from a slot's K/V.",
                labels,
                [self.model_name],
                stats["prefix_cache"]["tokens_reused"],
            )


def _family(kind, name: str, doc: str, labels: list[str], values: list[str], value: float):
    family = kind(name, doc, labels=labels)
    family.add_metric(values, value)
    return family


class ServerMetrics:
    """The registry behind `/metrics`: engine counters and the server's latency histograms."""

    def __init__(self, stats: Callable[[], dict], *, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats, model_name=model_name))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry).labels(
                model_name
            )

        self.ttft = histogram("idefics_time_to_first_token_seconds", "Arrival to first token.")
        self.itl = histogram("idefics_inter_token_latency_seconds", "Between two tokens of one choice.")
        self.e2e = histogram("idefics_e2e_request_latency_seconds", "Arrival to the last token.")
        self.queue_time = histogram("idefics_request_queue_time_seconds", "Arrival to the start of prefill.")

    def observe_finish(self, event: FinishEvent) -> None:
        """Record one finished choice's timings (cancelled and failed ones included: they are latency too)."""
        for key, series in (("ttft", self.ttft), ("e2e", self.e2e), ("queue_time", self.queue_time)):
            value = event.timings.get(key)
            if value is not None:
                series.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
