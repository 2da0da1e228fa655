"""Counters and latency summaries the engine keeps (`Engine.stats()`); a server exports them as it likes."""

from __future__ import annotations

import statistics
import threading
from collections import deque

WINDOW = 4096  # latency samples kept per series (the most recent ones)


class LatencySeries:
    """The count of all samples and the mean / p50 / p99 of the latest WINDOW, in seconds."""

    def __init__(self):
        self.count = 0
        self.samples: deque[float] = deque(maxlen=WINDOW)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.samples.append(seconds)

    def summary(self) -> dict[str, float | int]:
        data = sorted(self.samples)
        if not data:
            return {"count": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0}
        pick = lambda q: data[min(len(data) - 1, int(q * len(data)))]  # noqa: E731
        return {"count": self.count, "mean": statistics.fmean(data), "p50": pick(0.5), "p99": pick(0.99)}


class EngineMetrics:
    """Token counts, finish reasons and latencies; updated by the engine thread, read from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_total = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.constrained_total = {"json_schema": 0, "json_object": 0, "regex": 0, "choice": 0}
        self.latency = {name: LatencySeries() for name in ("ttft", "itl", "e2e", "queue_time")}

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.latency[name].add(seconds)

    def finished(self, reason: str) -> None:
        with self.lock:
            self.finished_total[reason] += 1

    def constrained(self, kind: str) -> None:
        """Count an accepted request with a structured-output constraint of this kind."""
        with self.lock:
            self.constrained_total[kind] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "finished_total": dict(self.finished_total),
                "constrained_total": dict(self.constrained_total),
                **{name: series.summary() for name, series in self.latency.items()},
            }
