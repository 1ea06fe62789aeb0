"""Per-operator prefill cost model, fitted to timings profiled on the real model runner.

attention(n, p) = a0 + a1*n + a2*n^2 + ap*n*p seconds for a prompt piece of n tokens after p
tokens whose KV exists already (a cached prefix, earlier chunks): the quadratic term is the
piece's causal score matrix, the last its scores against the earlier keys. mlp(n) = m0 + m1*n.
A prefill is num_layers of each. A batch of pieces pays attention per piece (each attends only to
its own prompt) and one MLP over all tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


def remaining_s(model, piece_tokens: list[int], next_op: int, piece_past: list[int] | None = None) -> float:
    """Time of operators next_op .. 2*num_layers-1 under `model.op_s` (even: attention, odd: MLP)."""
    num_ops = 2 * model.num_layers
    attn_ops = (num_ops - next_op + 1) // 2
    mlp_ops = (num_ops - next_op) // 2
    return attn_ops * model.op_s(0, piece_tokens, piece_past) + mlp_ops * model.op_s(1, piece_tokens)


@dataclass(frozen=True)
class OperatorCostModel:
    num_layers: int
    attention_coeffs: tuple[float, float, float]
    mlp_coeffs: tuple[float, float]
    # Seconds per (piece token, earlier token) pair. 0 where unknown (profiles from before it,
    # the simulator's hardware profiles): pieces are then costed as if nothing came before them.
    attention_past_s: float = 0.0

    def attention_s(self, num_tokens: int, past_tokens: int = 0) -> float:
        a0, a1, a2 = self.attention_coeffs
        return max(0.0, a0 + a1 * num_tokens + a2 * num_tokens * num_tokens
                   + self.attention_past_s * num_tokens * past_tokens)

    def mlp_s(self, num_tokens: int) -> float:
        m0, m1 = self.mlp_coeffs
        return max(0.0, m0 + m1 * num_tokens)

    def op_s(self, op_index: int, piece_tokens: list[int], piece_past: list[int] | None = None) -> float:
        """Cost of operator `op_index` (even: attention, odd: MLP) over a batch of pieces, the
        i-th of piece_tokens[i] tokens after piece_past[i] earlier ones (none if not given)."""
        if op_index % 2 == 0:
            past = piece_past or [0] * len(piece_tokens)
            return sum(self.attention_s(n, p) for n, p in zip(piece_tokens, past))
        return self.mlp_s(sum(piece_tokens))

    def remaining_s(self, piece_tokens: list[int], next_op: int, piece_past: list[int] | None = None) -> float:
        return remaining_s(self, piece_tokens, next_op, piece_past)

    def prefill_s(self, num_tokens: int, past_tokens: int = 0) -> float:
        return self.remaining_s([num_tokens], 0, [past_tokens])

    @classmethod
    def fit(cls, num_layers: int, samples: list[tuple[str, int, float]]) -> "OperatorCostModel":
        """samples: (kind 'attention'|'mlp', tokens, seconds) measured on the runner."""
        attn = [(n, s) for k, n, s in samples if k == "attention"]
        mlp = [(n, s) for k, n, s in samples if k == "mlp"]
        if len(attn) < 3 or len(mlp) < 2:
            raise ValueError("need at least 3 attention and 2 MLP samples to fit the cost model")
        a = _weighted_lstsq([[1.0, n, n * n] for n, _ in attn], [s for _, s in attn])
        m = _weighted_lstsq([[1.0, n] for n, _ in mlp], [s for _, s in mlp])
        return cls(num_layers, (a[0], a[1], a[2]), (m[0], m[1]))

    def with_past(self, samples: list[tuple[int, int, float]]) -> "OperatorCostModel":
        """This model plus the past term, fitted to attention timings (tokens, past tokens, s)
        of pieces after earlier KV: what the fitted attention leaves unexplained, per pair."""
        usable = [(n, p, s) for n, p, s in samples if n > 0 and p > 0]
        if not usable:
            raise ValueError("need attention timings of pieces after earlier KV to fit the past term")
        (ap,) = _weighted_lstsq([[float(n * p)] for n, p, _ in usable],
                                [s - self.attention_s(n) for n, _, s in usable], [s for _, _, s in usable])
        return dataclasses.replace(self, attention_past_s=max(0.0, ap))

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "attention_coeffs": list(self.attention_coeffs),
                "mlp_coeffs": list(self.mlp_coeffs), "attention_past_s": self.attention_past_s}

    @classmethod
    def from_dict(cls, d: dict) -> "OperatorCostModel":
        return cls(d["num_layers"], tuple(d["attention_coeffs"]), tuple(d["mlp_coeffs"]),
                   d.get("attention_past_s", 0.0))


def _weighted_lstsq(rows: list[list[float]], targets: list[float], scales: list[float] | None = None) -> list[float]:
    # Relative error matters (a 20% miss on a 1 ms operator is as bad as on a 100 ms one), so
    # weight each sample by 1/target (by 1/scale where the target is a residual of it).
    x = np.asarray(rows, dtype=float)
    y = np.asarray(targets, dtype=float)
    w = 1.0 / np.maximum(np.asarray(targets if scales is None else scales, dtype=float), 1e-6)
    coeffs, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return [float(c) for c in coeffs]


class CalibratedCostModel:
    """A profiled model corrected online by measured/predicted ratios (one per operator kind).

    Profiles are taken on a warm, idle runner; in service, cold caches and other work on the host
    make operators slower by a roughly constant factor, which this learns with an exponential
    moving average. Deterministic: the same observations give the same predictions.
    """

    def __init__(self, base: OperatorCostModel, smoothing: float = 0.05):
        self.base = base
        self.num_layers = base.num_layers
        self._alpha = smoothing
        self.scale = {"attention": 1.0, "mlp": 1.0}
        # Moving sums of measured and predicted seconds: their ratio weights each operator by its
        # duration, so many tiny, overhead-dominated operators cannot inflate big ones.
        self._measured = {"attention": 0.0, "mlp": 0.0}
        self._predicted = {"attention": 0.0, "mlp": 0.0}

    def observe(self, op_index: int, piece_tokens: list[int], measured_s: float,
                piece_past: list[int] | None = None) -> None:
        predicted = self.base.op_s(op_index, piece_tokens, piece_past)
        if predicted <= 0 or measured_s <= 0:
            return
        kind = "attention" if op_index % 2 == 0 else "mlp"
        # Clip: one outlier (a page fault, a descheduled thread) must not swing the estimate.
        measured_s = min(max(measured_s, 0.2 * predicted), 5.0 * predicted)
        self._measured[kind] += self._alpha * (measured_s - self._measured[kind])
        self._predicted[kind] += self._alpha * (predicted - self._predicted[kind])
        self.scale[kind] = self._measured[kind] / self._predicted[kind]

    def op_s(self, op_index: int, piece_tokens: list[int], piece_past: list[int] | None = None) -> float:
        kind = "attention" if op_index % 2 == 0 else "mlp"
        return self.scale[kind] * self.base.op_s(op_index, piece_tokens, piece_past)

    def remaining_s(self, piece_tokens: list[int], next_op: int, piece_past: list[int] | None = None) -> float:
        return remaining_s(self, piece_tokens, next_op, piece_past)

    def prefill_s(self, num_tokens: int, past_tokens: int = 0) -> float:
        return self.remaining_s([num_tokens], 0, [past_tokens])
