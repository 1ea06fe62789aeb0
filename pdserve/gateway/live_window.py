"""The last minute of requests as this gateway saw them, for the dashboard: rate, errors and
TTFT/TPOT percentiles. Pure bookkeeping on an injected clock; bounded in memory."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.clock import Clock


@dataclass(frozen=True)
class Finished:
    at_s: float
    status: int
    ttft_ms: float | None
    tpot_ms: float | None     # mean time per output token after the first


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


class LiveWindow:
    def __init__(self, clock: Clock, window_s: float = 60.0, max_requests: int = 20_000):
        self.clock = clock
        self.window_s = window_s
        self._finished: deque[Finished] = deque(maxlen=max_requests)

    def record(self, status: int, ttft_s: float | None, latency_s: float, num_generated: int) -> None:
        ttft_ms = ttft_s * 1e3 if ttft_s is not None else None
        tpot_ms = None
        if ttft_s is not None and num_generated > 1:
            tpot_ms = (latency_s - ttft_s) * 1e3 / (num_generated - 1)
        self._finished.append(Finished(self.clock.now_s(), status, ttft_ms, tpot_ms))

    def summary(self) -> dict:
        now_s = self.clock.now_s()
        while self._finished and self._finished[0].at_s < now_s - self.window_s:
            self._finished.popleft()
        done = list(self._finished)
        ok = [f for f in done if f.status == 200]
        ttft = [f.ttft_ms for f in ok if f.ttft_ms is not None]
        tpot = [f.tpot_ms for f in ok if f.tpot_ms is not None]
        return {
            "window_s": self.window_s,
            "requests": len(done),
            "requests_per_s": len(done) / self.window_s,
            "ok": len(ok),
            "rejected": sum(1 for f in done if f.status in (429, 503)),
            "failed": sum(1 for f in done if f.status >= 500 and f.status != 503),
            "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
            "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
        }
