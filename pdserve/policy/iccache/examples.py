"""The example cache's bookkeeping: bounded bytes, value-per-byte eviction, cost-aware replay.

An example's value is its successful offloads, decayed with a half-life so that what helped last
week counts less than what helps today. When room is needed, the lowest value per byte goes
first. Every value decays at the same rate, so the order of values per byte changes only when an
example's value or size does: a heap keyed by that time-invariant order finds the victim in
O(log n). The scan of every example it replaced made each add at capacity, on the gateway's event
loop, cost 23.6 ms at 25,000 examples (`python benchmarks/iccache_eviction.py`). Replay re-asks
the large model for the examples whose improvement is worth most: those used often (decayed
value) whose answers rated poorly; an example replayed `max_replays` times is dropped, since the
large model cannot make it good."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

# A new example starts with this much value: enough to survive until it has been tried once,
# too little to displace an example that has earned its place.
_NEW_EXAMPLE_VALUE = 0.5
# Quality of an answer nobody rated yet: the middle, so rated-good answers are preferred and
# rated-bad ones are replayed first.
_UNRATED_QUALITY = 0.5


@dataclass
class Example:
    example_id: int
    request_text: str
    answer_text: str
    model: str
    embedding: np.ndarray            # unit-norm float32
    created_s: float
    value: float = _NEW_EXAMPLE_VALUE
    value_at_s: float = 0.0           # when `value` was last brought up to date
    num_uses: int = 0                 # offloads it took part in
    num_successes: int = 0            # ... that were rated good
    quality: float = _UNRATED_QUALITY  # rating of its answer, 0..1
    num_ratings: int = 0
    num_replays: int = 0
    tenant: str = ""                  # whose request it answered: the scope it may be shown in

    @property
    def num_bytes(self) -> int:
        return len(self.request_text.encode()) + len(self.answer_text.encode()) + self.embedding.nbytes

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed: an unused example is neither good nor bad."""
        return (self.num_successes + 1) / (self.num_uses + 2)


@dataclass(frozen=True)
class CacheConfig:
    capacity_bytes: int = 64 << 20
    value_half_life_s: float = 7 * 24 * 3600.0
    max_replays: int = 5


@dataclass
class ExampleCache:
    config: CacheConfig = field(default_factory=CacheConfig)
    examples: dict[int, Example] = field(default_factory=dict)
    num_bytes: int = 0
    num_evictions: int = 0
    # (eviction key, example id); an entry whose key is no longer its example's is skipped.
    _heap: list = field(default_factory=list, repr=False)
    _keys: dict[int, float] = field(default_factory=dict, repr=False)

    def value_now(self, ex: Example, now_s: float) -> float:
        age_s = max(0.0, now_s - ex.value_at_s)
        return ex.value * 0.5 ** (age_s / self.config.value_half_life_s)

    def _eviction_key(self, ex: Example) -> float:
        """log2 of value now per byte, plus now / half-life: the same for every `now`."""
        if ex.value <= 0:
            return -math.inf
        return math.log2(ex.value) + ex.value_at_s / self.config.value_half_life_s - math.log2(ex.num_bytes)

    def _rekey(self, ex: Example) -> None:
        key = self._keys[ex.example_id] = self._eviction_key(ex)
        heapq.heappush(self._heap, (key, ex.example_id))
        if len(self._heap) > 4 * len(self.examples) + 64:     # stale entries: rebuild
            self._heap = [(k, i) for i, k in self._keys.items()]
            heapq.heapify(self._heap)

    def restore(self, ex: Example) -> None:
        """Keep `ex` as it was saved (its value and when it was last updated), evicting nothing."""
        self.remove(ex.example_id)
        self.examples[ex.example_id] = ex
        self.num_bytes += ex.num_bytes
        self._rekey(ex)

    def add(self, ex: Example, now_s: float) -> list[int]:
        """Keeps `ex` and returns the ids evicted to make room ([ex's id] when it alone is too big)."""
        if ex.num_bytes > self.config.capacity_bytes:
            return [ex.example_id]
        ex.value_at_s = now_s
        evicted = []
        while self.num_bytes + ex.num_bytes > self.config.capacity_bytes:
            key, victim = heapq.heappop(self._heap)
            if self._keys.get(victim) != key:
                continue
            self.remove(victim)
            self.num_evictions += 1
            evicted.append(victim)
        self.examples[ex.example_id] = ex
        self.num_bytes += ex.num_bytes
        self._rekey(ex)
        return evicted

    def remove(self, example_id: int) -> Example | None:
        ex = self.examples.pop(example_id, None)
        if ex is not None:
            self.num_bytes -= ex.num_bytes
            del self._keys[example_id]
        return ex

    def record_offload(self, example_ids: list[int], success: bool, now_s: float) -> None:
        """An answer made with these examples was rated: good ones earn value."""
        for example_id in example_ids:
            ex = self.examples.get(example_id)
            if ex is None:
                continue    # evicted since; the rating still trains the bandit and the selector
            ex.num_uses += 1
            if success:
                ex.num_successes += 1
                ex.value = self.value_now(ex, now_s) + 1.0
                ex.value_at_s = now_s
                self._rekey(ex)

    def rate_answer(self, example_id: int, quality: float) -> None:
        """A rating of the example's own answer (feedback on the large model's response, or a
        gold-answer score): a running mean."""
        ex = self.examples.get(example_id)
        if ex is not None:
            ex.num_ratings += 1
            ex.quality += (quality - ex.quality) / ex.num_ratings

    def replay_candidates(self, now_s: float, limit: int) -> list[Example]:
        """The examples a re-ask would improve most: expected gain = (1 - quality) x (value + 1)."""
        eligible = (e for e in self.examples.values() if e.num_replays < self.config.max_replays)
        gain = lambda e: (1.0 - e.quality) * (self.value_now(e, now_s) + 1.0)  # noqa: E731
        return heapq.nsmallest(limit, eligible, key=lambda e: (-gain(e), e.example_id))

    def apply_replay(self, example_id: int, answer_text: str, quality: float) -> str:
        """The large model answered again: keep the better answer. Returns 'replaced', 'kept' or
        'dropped' (the last replay allowed did not make the example good)."""
        ex = self.examples[example_id]
        ex.num_replays += 1
        outcome = "kept"
        if quality > ex.quality:
            self.num_bytes += len(answer_text.encode()) - len(ex.answer_text.encode())
            ex.answer_text, ex.quality, ex.num_ratings = answer_text, quality, 1
            self._rekey(ex)                  # its size, so its value per byte, changed
            outcome = "replaced"
        if ex.num_replays >= self.config.max_replays and ex.quality < 0.5:
            self.remove(example_id)
            return "dropped"
        return outcome
