"""Per request: the large model, or the small model with examples (IC-Cache's router).

A contextual bandit with linear Thompson sampling: each arm keeps a Bayesian linear model of
answer quality (the reward, 0..1, from feedback) over the request's context (how similar and how
useful the selected examples are, how many, how long the prompt is). For a request each arm
samples a predicted quality mu and is scored S = mu - l0 * tanh(gamma * L) * C, where L is the
live load of the arm's pool (0 idle .. 1 full) and C the arm's relative cost: under load the
costly arm backs off unless it is clearly better. Sampling (not the mean) keeps exploring both
arms; a seeded generator keeps it deterministic for the simulator and tests."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class Arm(enum.Enum):
    LARGE = "large"
    SMALL_WITH_EXAMPLES = "small"


def context(best_similarity: float, mean_utility: float, num_examples: int, max_examples: int,
            num_prompt_tokens: int) -> np.ndarray:
    return np.array([1.0, best_similarity, mean_utility, num_examples / max(1, max_examples),
                     min(num_prompt_tokens, 4096) / 4096])


_DIM = 5


@dataclass(frozen=True)
class BanditConfig:
    load_penalty_l0: float = 0.5      # at full load the costly arm loses up to this much quality
    load_gamma: float = 3.0           # how fast the penalty saturates with load
    cost_large: float = 1.0
    cost_small: float = 0.2           # a small-model request costs about this fraction of a large one
    prior_precision: float = 1.0      # ridge: how strongly the prior (quality 0.5) holds
    noise_scale: float = 0.25         # spread of the sampled models: exploration


@dataclass
class _LinearArm:
    precision: np.ndarray             # A = prior * I + sum x x^T
    moment: np.ndarray                # b = sum r x  (+ the prior's pull to 0.5 on the bias)
    num_rewards: int = 0

    def mean(self) -> np.ndarray:
        return np.linalg.solve(self.precision, self.moment)


@dataclass(frozen=True)
class Decision:
    arm: Arm
    scores: dict[Arm, float]
    sampled_quality: dict[Arm, float]


@dataclass
class ModelChooser:
    config: BanditConfig = field(default_factory=BanditConfig)
    seed: int = 0
    paused: bool = False              # an operator stopped offloading: every request goes large

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)
        p = self.config.prior_precision
        self._arms = {arm: _LinearArm(p * np.eye(_DIM), np.eye(_DIM)[0] * 0.5 * p) for arm in Arm}

    def choose(self, x: np.ndarray, load: dict[Arm, float], small_possible: bool = True) -> Decision:
        """`load`: each pool's utilisation, 0..1. `small_possible`: examples were found."""
        if self.paused or not small_possible:
            return Decision(Arm.LARGE, {}, {})
        sampled, scores = {}, {}
        for arm, model in self._arms.items():
            cov = np.linalg.inv(model.precision) * self.config.noise_scale ** 2
            theta = self._rng.multivariate_normal(model.mean(), cov)
            sampled[arm] = float(theta @ x)
            scores[arm] = sampled[arm] - self._penalty(arm, load.get(arm, 0.0))
        best = max(Arm, key=lambda a: (scores[a], a is Arm.LARGE))   # ties: the large model
        return Decision(best, scores, sampled)

    def _penalty(self, arm: Arm, load: float) -> float:
        cost = self.config.cost_large if arm is Arm.LARGE else self.config.cost_small
        return self.config.load_penalty_l0 * math.tanh(self.config.load_gamma * max(0.0, load)) * cost

    def learn(self, arm: Arm, x: np.ndarray, reward: float) -> None:
        model = self._arms[arm]
        model.precision = model.precision + np.outer(x, x)
        model.moment = model.moment + reward * x
        model.num_rewards += 1

    def expected_quality(self, arm: Arm, x: np.ndarray) -> float:
        return float(self._arms[arm].mean() @ x)

    def state(self) -> dict:
        """What feedback taught it, as JSON (persisted, so a restart keeps it)."""
        return {"paused": self.paused, "arms": {
            arm.value: {"precision": m.precision.tolist(), "moment": m.moment.tolist(), "num_rewards": m.num_rewards}
            for arm, m in self._arms.items()}}

    def restore(self, state: dict) -> None:
        """The inverse of state(); arms it does not name keep their prior."""
        self.paused = bool(state.get("paused", False))
        for arm in Arm:
            saved = state.get("arms", {}).get(arm.value)
            if saved is not None and np.shape(saved["precision"]) == (_DIM, _DIM):
                self._arms[arm] = _LinearArm(np.array(saved["precision"], dtype=float),
                                             np.array(saved["moment"], dtype=float), int(saved["num_rewards"]))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per arm: rewards seen and the mean model's quality at an average context."""
        probe = context(0.8, 0.6, 2, 3, 512)
        return {arm.value: {"num_rewards": m.num_rewards, "expected_quality": float(m.mean() @ probe)}
                for arm, m in self._arms.items()}
