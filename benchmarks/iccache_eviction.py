"""IC-Cache's example cache at capacity: adding an example (which evicts) and picking replay
candidates, against the scans they replaced, side by side in one run.

    python benchmarks/iccache_eviction.py [--json] [--examples 1000,25000] [--adds 300]

`before` is ExampleCache as it was until 2026-12-05, kept here as the baseline: each eviction
scanned every example for the lowest decayed value per byte, and replay sorted every example.
`now` is pdserve's: a heap keyed by the order of values per byte, which decay alike, and a
partial selection for replay. Both caches hold the same examples (about 2.7 KB each: a request,
an answer and a 384-dimension embedding, as the service stores them), filled to capacity, with
some values raised by rewarded offloads; then each adds the same new examples, alternating.
Reports microseconds per add (p50) and per replay pick, and now / before.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from pdserve.policy.iccache.examples import CacheConfig, Example, ExampleCache

_EXAMPLE_BYTES = 2_700


class ScanningCache(ExampleCache):
    """The eviction and replay pick of before: a scan of every example each time."""

    def add(self, ex: Example, now_s: float) -> list[int]:
        if ex.num_bytes > self.config.capacity_bytes:
            return [ex.example_id]
        ex.value_at_s = now_s
        evicted = []
        while self.num_bytes + ex.num_bytes > self.config.capacity_bytes:
            victim = min(self.examples.values(), key=lambda e: (self.value_now(e, now_s) / e.num_bytes, e.example_id))
            self.examples.pop(victim.example_id)
            self.num_bytes -= victim.num_bytes
            self.num_evictions += 1
            evicted.append(victim.example_id)
        self.examples[ex.example_id] = ex
        self.num_bytes += ex.num_bytes
        return evicted

    def replay_candidates(self, now_s: float, limit: int) -> list[Example]:
        eligible = [e for e in self.examples.values() if e.num_replays < self.config.max_replays]
        gain = lambda e: (1.0 - e.quality) * (self.value_now(e, now_s) + 1.0)  # noqa: E731
        return sorted(eligible, key=lambda e: (-gain(e), e.example_id))[:limit]


def _example(example_id: int, rng: np.random.Generator, now_s: float) -> Example:
    embedding = rng.standard_normal(384).astype(np.float32)
    text_bytes = _EXAMPLE_BYTES - embedding.nbytes
    split = int(rng.integers(text_bytes // 4, text_bytes // 2))
    return Example(example_id, "q" * split, "a" * (text_bytes - split), "large", embedding, created_s=now_s)


def _filled(cache: ExampleCache, num_examples: int, seed: int) -> ExampleCache:
    rng, now_s = np.random.default_rng(seed), 1.8e9
    for example_id in range(num_examples):
        now_s += 1.0
        cache.add(_example(example_id, rng, now_s), now_s)
        if example_id % 7 == 0:
            cache.record_offload([int(rng.integers(0, example_id + 1))], success=True, now_s=now_s)
    return cache


def measure(num_examples: int, num_adds: int) -> dict:
    config = CacheConfig(capacity_bytes=num_examples * _EXAMPLE_BYTES)
    caches = {"before": _filled(ScanningCache(config), num_examples, 1),
              "now": _filled(ExampleCache(config), num_examples, 1)}
    rng, now_s = np.random.default_rng(2), 1.8e9 + num_examples
    adds: dict[str, list[float]] = {"before": [], "now": []}
    evicted: dict[str, list[int]] = {"before": [], "now": []}
    for i in range(num_adds):
        now_s += 1.0
        ex = _example(num_examples + i, rng, now_s)
        for key in ("before", "now") if i % 2 else ("now", "before"):
            copy = Example(**{**ex.__dict__})
            start = time.perf_counter()
            evicted[key] += caches[key].add(copy, now_s)
            adds[key].append(time.perf_counter() - start)
    picks = {}
    for key, cache in caches.items():
        start = time.perf_counter()
        cache.replay_candidates(now_s, 1)
        picks[key] = time.perf_counter() - start
    row = {"examples": num_examples, "adds": num_adds, "same_evictions": evicted["before"] == evicted["now"],
           "add_before_p50_us": round(statistics.median(adds["before"]) * 1e6, 1),
           "add_now_p50_us": round(statistics.median(adds["now"]) * 1e6, 1),
           "replay_pick_before_us": round(picks["before"] * 1e6, 1), "replay_pick_now_us": round(picks["now"] * 1e6, 1)}
    row["add_now_vs_before"] = round(row["add_now_p50_us"] / row["add_before_p50_us"], 4)
    row["replay_pick_now_vs_before"] = round(row["replay_pick_now_us"] / row["replay_pick_before_us"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="1000,25000", help="cache sizes in examples, comma-separated")
    parser.add_argument("--adds", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(int(n), args.adds) for n in args.examples.split(",")]
    if args.json:
        print(json.dumps({"results": rows}))
    else:
        for r in rows:
            print(f"{r['examples']:>6} examples: add {r['add_before_p50_us']:9.1f} -> {r['add_now_p50_us']:6.1f} us "
                  f"(x{r['add_now_vs_before']}), replay pick {r['replay_pick_before_us']:9.1f} -> "
                  f"{r['replay_pick_now_us']:9.1f} us (x{r['replay_pick_now_vs_before']}), "
                  f"same evictions: {r['same_evictions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
