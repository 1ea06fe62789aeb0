"""The example cache's bookkeeping: bounded bytes, value-per-byte eviction, cost-aware replay.

An example's value is its successful offloads, decayed with a half-life so that what helped last
week counts less than what helps today. When room is needed, the lowest value per byte goes
first. Replay re-asks the large model for the examples whose improvement is worth most: those
used often (decayed value) whose answers rated poorly; an example replayed `max_replays` times is
dropped, since the large model cannot make it good."""
from __future__ import annotations

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

    def value_now(self, ex: Example, now_s: float) -> float:
        age_s = max(0.0, now_s - ex.value_at_s)
        return ex.value * 0.5 ** (age_s / self.config.value_half_life_s)

    def add(self, ex: Example, now_s: float) -> list[int]:
        """Keeps `ex` and returns the ids evicted to make room ([ex's id] when it alone is too big)."""
        if ex.num_bytes > self.config.capacity_bytes:
            return [ex.example_id]
        ex.value_at_s = now_s
        evicted = []
        while self.num_bytes + ex.num_bytes > self.config.capacity_bytes:
            victim = min(self.examples.values(), key=lambda e: (self.value_now(e, now_s) / e.num_bytes, e.example_id))
            self.remove(victim.example_id)
            self.num_evictions += 1
            evicted.append(victim.example_id)
        self.examples[ex.example_id] = ex
        self.num_bytes += ex.num_bytes
        return evicted

    def remove(self, example_id: int) -> Example | None:
        ex = self.examples.pop(example_id, None)
        if ex is not None:
            self.num_bytes -= ex.num_bytes
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

    def rate_answer(self, example_id: int, quality: float) -> None:
        """A rating of the example's own answer (feedback on the large model's response, or a
        gold-answer score): a running mean."""
        ex = self.examples.get(example_id)
        if ex is not None:
            ex.num_ratings += 1
            ex.quality += (quality - ex.quality) / ex.num_ratings

    def replay_candidates(self, now_s: float, limit: int) -> list[Example]:
        """The examples a re-ask would improve most: expected gain = (1 - quality) x (value + 1)."""
        eligible = [e for e in self.examples.values() if e.num_replays < self.config.max_replays]
        gain = lambda e: (1.0 - e.quality) * (self.value_now(e, now_s) + 1.0)  # noqa: E731
        return sorted(eligible, key=lambda e: (-gain(e), e.example_id))[:limit]

    def apply_replay(self, example_id: int, answer_text: str, quality: float) -> str:
        """The large model answered again: keep the better answer. Returns 'replaced', 'kept' or
        'dropped' (the last replay allowed did not make the example good)."""
        ex = self.examples[example_id]
        ex.num_replays += 1
        outcome = "kept"
        if quality > ex.quality:
            self.num_bytes += len(answer_text.encode()) - len(ex.answer_text.encode())
            ex.answer_text, ex.quality, ex.num_ratings = answer_text, quality, 1
            outcome = "replaced"
        if ex.num_replays >= self.config.max_replays and ex.quality < 0.5:
            self.remove(example_id)
            return "dropped"
        return outcome
