"""Baseline: aggregated workers (prefill and decode in one engine, vLLM-style iterations: a
waiting prompt is prefilled before the next decode step, stalling the batch) behind one of the
routing policies in pdserve.policy.baseline_routers. Prefix caching per worker (LRU of 512-token blocks)
lets prefix-aware routing skip recomputing shared prefixes, as SGLang's router does.
"""
from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve.policy.baseline_routers import WorkerLoad
from pdserve.sim.fleet import SimRequest
from pdserve.sim.hardware import HardwareProfile
from pdserve.traces import MOONCAKE_BLOCK_TOKENS

_CACHE_BLOCKS = 20_000   # prefix-cache capacity per worker, in 512-token blocks


@dataclass
class _AggWorker:
    load: WorkerLoad
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    cache: OrderedDict = field(default_factory=OrderedDict)


class AggregatedSimulation:
    def __init__(self, hw: HardwareProfile, num_workers: int, router, block_hashes: dict[str, tuple[int, ...]]):
        self.hw = hw
        self.router = router
        self.block_hashes = block_hashes
        self.workers = [_AggWorker(WorkerLoad(f"agg-{i}", 0, set())) for i in range(num_workers)]
        self._events: list = []
        self._seq = itertools.count()
        self.now_s = 0.0

    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        for r in requests:
            self._at(r.arrival_s, self._arrive, r)
        while self._events:
            self.now_s, _, fn, args = heapq.heappop(self._events)
            fn(*args)
        return requests

    def _arrive(self, r: SimRequest) -> None:
        hashes = self.block_hashes.get(r.req_id, ())
        load = self.router.pick([w.load for w in self.workers], hashes)
        w = next(w for w in self.workers if w.load is load)
        w.load.num_active += 1
        w.waiting.append(r)
        self._iterate(w)

    def _iterate(self, w: _AggWorker) -> None:
        if w.busy:
            return
        if w.waiting:
            r = w.waiting.popleft()
            hashes = self.block_hashes.get(r.req_id, ())
            hits = w.load.prefix_hits(hashes)
            todo = max(1, r.input_tokens - hits * MOONCAKE_BLOCK_TOKENS)
            self._remember(w, hashes)
            w.busy = True
            self._at(self.now_s + self.hw.prefill_s(todo), self._prefilled, w, r)
        elif w.running:
            w.busy = True
            self._at(self.now_s + self.hw.decode_step_s(len(w.running)), self._stepped, w)

    def _remember(self, w: _AggWorker, hashes: tuple[int, ...]) -> None:
        for h in hashes:
            w.cache[h] = None
            w.cache.move_to_end(h)
            w.load.cached_blocks.add(h)
        while len(w.cache) > _CACHE_BLOCKS:
            old, _ = w.cache.popitem(last=False)
            w.load.cached_blocks.discard(old)

    def _prefilled(self, w: _AggWorker, r: SimRequest) -> None:
        w.busy = False
        r.first_token_s, r.num_generated_tokens = self.now_s, 1
        if r.output_tokens <= 1:
            self._done(w, r)
        else:
            w.running.append(r)
        self._iterate(w)

    def _stepped(self, w: _AggWorker) -> None:
        w.busy = False
        still = []
        for r in w.running:
            r.num_generated_tokens += 1
            if r.num_generated_tokens >= r.output_tokens:
                self._done(w, r)
            else:
                still.append(r)
        w.running = still
        self._iterate(w)

    def _done(self, w: _AggWorker, r: SimRequest) -> None:
        r.finish_s = self.now_s
        w.load.num_active -= 1
