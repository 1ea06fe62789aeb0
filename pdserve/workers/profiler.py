"""`pdserve profile`: time the real model runner's operators and fit the cost model.

Measures one layer's attention and MLP operators at several prompt lengths (every layer of a
Llama model has the same shapes), takes the median of a few repeats, and fits
pdserve.policy.cost_model.OperatorCostModel. Also reports decode step time and KV bytes/token.
"""
from __future__ import annotations

import statistics
import time

import torch

from pdserve.policy.cost_model import OperatorCostModel
from pdserve.workers.model.llama import LlamaModel

DEFAULT_TOKEN_COUNTS = (16, 64, 256, 1024, 2048)


def _median_s(fn, repeats: int) -> float:
    fn()   # warm-up: allocator and kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile_operators(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3):
    cfg = model.config
    samples: list[tuple[str, int, float]] = []
    with torch.inference_mode():
        for n in token_counts:
            if n > cfg.max_position_tokens:
                continue
            hidden = torch.randn(n, cfg.hidden_size)
            positions = torch.arange(n)
            samples.append(("attention", n, _median_s(lambda: model.prefill_attention(0, hidden, positions), repeats)))
            samples.append(("mlp", n, _median_s(lambda: model.mlp(0, hidden), repeats)))
    return samples


def fit_cost_model(model: LlamaModel, token_counts=DEFAULT_TOKEN_COUNTS, repeats: int = 3):
    samples = profile_operators(model, token_counts, repeats)
    cost = OperatorCostModel.fit(model.config.num_layers, samples)
    errors = [abs((cost.attention_s(n) if k == "attention" else cost.mlp_s(n)) - s) / s for k, n, s in samples]
    return cost, samples, max(errors)
