"""Baseline: aggregated workers (prefill and decode in one engine) behind one of the routing
policies in pdserve.policy.baseline_routers. Two schedulers:
- whole prompts (`chunk_tokens=None`): a waiting prompt is prefilled before the next decode
  step, stalling the batch (vLLM before chunked prefill);
- chunked prefill (`chunk_tokens=N`): every step runs all decodes plus prompt chunks up to a
  budget of N tokens, oldest prompt first (vLLM's default scheduler). A step costs the decode
  step plus the chunks' prefill work, attention counted against each chunk's position in its
  prompt.
Prefix caching per worker (LRU of 512-token blocks) lets prefix-aware routing skip recomputing
shared prefixes, as SGLang's router does.
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
    prefilled: dict = field(default_factory=dict)    # chunked: req_id -> prompt tokens done


class AggregatedSimulation:
    def __init__(self, hw: HardwareProfile, num_workers: int, router, block_hashes: dict[str, tuple[int, ...]],
                 chunk_tokens: int | None = None):
        self.hw = hw
        self.chunk_tokens = chunk_tokens
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
        if self.chunk_tokens:
            self._mixed_step(w)
        elif w.waiting:
            r = w.waiting.popleft()
            todo = r.input_tokens - self._first_uncached(w, r)
            w.busy = True
            self._at(self.now_s + self.hw.prefill_s(todo), self._prefilled, w, r)
        elif w.running:
            w.busy = True
            self._at(self.now_s + self.hw.decode_step_s(len(w.running)), self._stepped, w)

    def _mixed_step(self, w: _AggWorker) -> None:
        """Chunked prefill: one step of every running decode plus prompt chunks within the budget."""
        decodes = list(w.running)
        budget = self.chunk_tokens - len(decodes)
        chunks = []
        for r in w.waiting:
            if budget <= 0 or len(decodes) + len(chunks) >= self.hw.max_batch:
                break
            done = w.prefilled.get(r.req_id)
            if done is None:
                done = w.prefilled[r.req_id] = self._first_uncached(w, r)
            n = min(budget, r.input_tokens - done)
            chunks.append((r, done, n))
            budget -= n
        if not decodes and not chunks:
            return
        step_s = self.hw.decode_step_s(len(decodes)) if decodes else self.hw.prefill_base_s
        step_s += sum(self._chunk_s(done, n) for _, done, n in chunks)
        w.busy = True
        self._at(self.now_s + step_s, self._mixed_stepped, w, decodes, chunks)

    def _first_uncached(self, w: _AggWorker, r: SimRequest) -> int:
        """Where the prompt's computation starts: after its cached blocks, never past its last token."""
        hashes = self.block_hashes.get(r.req_id, ())
        hits = w.load.prefix_hits(hashes)
        self._remember(w, hashes)
        return min(r.input_tokens - 1, hits * MOONCAKE_BLOCK_TOKENS)

    def _chunk_s(self, done: int, n: int) -> float:
        # Linear work for the chunk's tokens; attention over everything before them in the prompt.
        return n / self.hw.prefill_tokens_per_s + self.hw.prefill_quad_s * ((done + n) ** 2 - done ** 2)

    def _mixed_stepped(self, w: _AggWorker, decodes: list, chunks: list) -> None:
        w.busy = False
        self._step_decodes(w, decodes)
        for r, done, n in chunks:
            w.prefilled[r.req_id] = done + n
            if done + n >= r.input_tokens:
                w.waiting.remove(r)
                del w.prefilled[r.req_id]
                self._first_token(w, r)
        self._iterate(w)

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
        self._first_token(w, r)
        self._iterate(w)

    def _first_token(self, w: _AggWorker, r: SimRequest) -> None:
        r.first_token_s, r.num_generated_tokens = self.now_s, 1
        if r.output_tokens <= 1:
            self._done(w, r)
        else:
            w.running.append(r)

    def _stepped(self, w: _AggWorker) -> None:
        w.busy = False
        self._step_decodes(w, list(w.running))
        self._iterate(w)

    def _step_decodes(self, w: _AggWorker, decodes: list) -> None:
        """One token for each of `decodes` (running requests); the finished ones leave the batch."""
        finished = set()
        for r in decodes:
            r.num_generated_tokens += 1
            if r.num_generated_tokens >= r.output_tokens:
                finished.add(r.req_id)
                self._done(w, r)
        if finished:
            w.running = [r for r in w.running if r.req_id not in finished]

    def _done(self, w: _AggWorker, r: SimRequest) -> None:
        r.finish_s = self.now_s
        w.load.num_active -= 1
