"""Which cached examples to put before a request: a similarity pre-filter, then a learned utility.

The vector index (an adapter) supplies the nearest examples with their cosine similarity. Those
above `min_similarity` are scored by a logistic model over features of the pair (similarity, the
example's smoothed success rate, its answer's rating, how often it was used), trained online from
the ratings of answers the examples took part in. Examples whose predicted utility clears the
threshold are kept (the best one always), at most k, best first; then laid out by example id, so
that requests reusing the same examples share a prompt prefix the workers' prefix caches can reuse.

The threshold is tuned on the recent (predicted utility, outcome) pairs: the cut that would have
classified them best."""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pdserve.policy.iccache.examples import Example

_NUM_FEATURES = 5


def features(similarity: float, ex: Example) -> np.ndarray:
    return np.array([1.0, similarity, ex.success_rate, ex.quality, np.log1p(ex.num_uses) / 5.0])


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-z)))


@dataclass(frozen=True)
class SelectionConfig:
    min_similarity: float = 0.5
    max_examples: int = 3
    learning_rate: float = 0.5
    initial_threshold: float = 0.5
    tuning_window: int = 500          # recent outcomes the threshold is tuned on
    min_outcomes_to_tune: int = 20    # fewer say nothing reliable about where the cut belongs


@dataclass(frozen=True)
class Chosen:
    example: Example
    similarity: float
    utility: float


@dataclass
class ExampleSelector:
    config: SelectionConfig = field(default_factory=SelectionConfig)
    # Start: utility rises with similarity and with an example's record; feedback refines it.
    weights: np.ndarray = field(default_factory=lambda: np.array([-2.0, 3.0, 1.0, 1.0, 0.0]))
    threshold: float = 0.5
    _outcomes: deque = field(default_factory=deque)

    def __post_init__(self):
        self.threshold = self.config.initial_threshold
        assert self.weights.shape == (_NUM_FEATURES,)

    def utility(self, similarity: float, ex: Example) -> float:
        return _sigmoid(float(self.weights @ features(similarity, ex)))

    def select(self, candidates: list[tuple[Example, float]]) -> list[Chosen]:
        """`candidates`: (example, cosine similarity) from the index. Returns the examples to
        use, in prompt order (by id)."""
        scored = [Chosen(ex, sim, self.utility(sim, ex)) for ex, sim in candidates if sim >= self.config.min_similarity]
        # The best candidate is always kept. The threshold is an absolute success probability:
        # on a task where answers seldom succeed, a few failures put every prediction below it,
        # and a selector that selects nothing never sees another outcome to learn from (nor does
        # the bandit's small arm). Whether weak examples are worth an offload is the bandit's
        # call: its context carries their utility.
        cut = min(self.threshold, max((c.utility for c in scored), default=0.0))
        kept = [c for c in scored if c.utility >= cut]
        best = sorted(kept, key=lambda c: (-c.utility, c.example.example_id))[:self.config.max_examples]
        return sorted(best, key=lambda c: c.example.example_id)

    def learn(self, chosen: list[Chosen], success: bool) -> None:
        """One rated answer: a logistic-regression step per example used, and the outcome kept
        for threshold tuning."""
        label = 1.0 if success else 0.0
        for c in chosen:
            x = features(c.similarity, c.example)
            self.weights = self.weights + self.config.learning_rate * (label - _sigmoid(float(self.weights @ x))) * x
            self._outcomes.append((c.utility, label))
            if len(self._outcomes) > self.config.tuning_window:
                self._outcomes.popleft()
        self._tune()

    def state(self) -> dict:
        return {"weights": self.weights.tolist(), "threshold": self.threshold,
                "outcomes": [list(o) for o in self._outcomes]}

    def restore(self, state: dict) -> None:
        """The inverse of state(); a state of another feature layout is ignored (the defaults stay)."""
        if len(state.get("weights", ())) != _NUM_FEATURES:
            return
        self.weights = np.array(state["weights"], dtype=float)
        self.threshold = float(state["threshold"])
        self._outcomes = deque((float(u), float(label)) for u, label in state.get("outcomes", ()))

    def _tune(self) -> None:
        """One sweep over the outcomes sorted by utility (it runs after every rating, on up to
        `tuning_window` outcomes): for each candidate cut, the outcomes it classifies right are
        the successes at or above it plus the failures below it."""
        if len(self._outcomes) < self.config.min_outcomes_to_tune:
            return
        pairs = sorted(self._outcomes)
        utilities = [u for u, _ in pairs]
        failures_below = [0]
        for _, label in pairs:
            failures_below.append(failures_below[-1] + (label != 1.0))
        successes = len(pairs) - failures_below[-1]

        def num_right(cut: float) -> int:
            below = bisect_left(utilities, cut)
            return successes - (below - failures_below[below]) + failures_below[below]
        # Ties go to the higher cut: of equally accurate thresholds, offload less.
        cuts = set(utilities) | {self.config.initial_threshold}
        self.threshold = max(cuts, key=lambda cut: (num_right(cut), cut))
