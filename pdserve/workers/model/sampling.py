"""Token sampling: greedy, temperature and nucleus (top_p), reproducible per (seed, step).

The generator is re-seeded from (seed, index of the generated token), so a token sampled on the
prefill worker and the ones sampled later on a decode worker follow the same sequence as in
aggregated mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Large odd multiplier spreading (seed, step) pairs over the 63-bit seed space.
_STEP_MIX = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be <= max_tokens")


def sample_token(logits: torch.Tensor, params: SamplingConfig, step_index: int,
                 eos_token_ids: tuple[int, ...] = ()) -> int:
    """`step_index`: which output token this is (counting tokens from before a migration)."""
    if step_index < params.min_tokens and eos_token_ids and not params.ignore_eos:
        logits = logits.clone()
        logits[list(eos_token_ids)] = float("-inf")
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed((params.seed * _STEP_MIX + step_index) & _SEED_MASK)
    else:
        gen.seed()
    return int(torch.multinomial(probs, 1, generator=gen))
