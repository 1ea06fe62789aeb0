"""Request routing across aggregated workers: the policies users pick today (vLLM's and
SGLang's routers), used as baselines against pdserve's disaggregated dispatch.

Each router sees per-worker load (requests in flight) and, for prefix-aware routing, which
prompt blocks each worker has cached. Pure and deterministic (a seeded RNG for power-of-two).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class WorkerLoad:
    worker_id: str
    num_active: int = 0
    cached_blocks: set[int] | None = None

    def prefix_hits(self, block_hashes: tuple[int, ...]) -> int:
        hits = 0
        for h in block_hashes:
            if not self.cached_blocks or h not in self.cached_blocks:
                break
            hits += 1
        return hits


class RoundRobin:
    name = "round-robin"

    def __init__(self):
        self._next = 0

    def pick(self, workers: list[WorkerLoad], block_hashes: tuple[int, ...] = ()) -> WorkerLoad:
        w = workers[self._next % len(workers)]
        self._next += 1
        return w


class LeastLoaded:
    name = "least-loaded"

    def pick(self, workers: list[WorkerLoad], block_hashes: tuple[int, ...] = ()) -> WorkerLoad:
        return min(workers, key=lambda w: (w.num_active, w.worker_id))


class PowerOfTwo:
    """Two random workers, the less loaded one wins (O(1) and nearly as good as least-loaded)."""

    name = "power-of-two"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def pick(self, workers: list[WorkerLoad], block_hashes: tuple[int, ...] = ()) -> WorkerLoad:
        a, b = self._rng.sample(workers, 2) if len(workers) > 1 else (workers[0], workers[0])
        return min((a, b), key=lambda w: (w.num_active, w.worker_id))


class PrefixAware:
    """SGLang-style cache-aware routing: the worker holding the longest cached prefix, unless that
    would overload it (more than `balance_threshold` above the least loaded), then least loaded."""

    name = "prefix-aware"

    def __init__(self, balance_threshold: int = 8):
        self.balance_threshold = balance_threshold

    def pick(self, workers: list[WorkerLoad], block_hashes: tuple[int, ...] = ()) -> WorkerLoad:
        least = min(workers, key=lambda w: (w.num_active, w.worker_id))
        best = max(workers, key=lambda w: (w.prefix_hits(block_hashes), -w.num_active, w.worker_id))
        if best.prefix_hits(block_hashes) == 0 or best.num_active - least.num_active > self.balance_threshold:
            return least
        return best


BASELINE_ROUTERS = {r.name: r for r in (RoundRobin, LeastLoaded, PowerOfTwo, PrefixAware)}
