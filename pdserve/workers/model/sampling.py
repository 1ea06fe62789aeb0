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
MAX_TOP_LOGPROBS = 20
_NUCLEUS_FIRST_TRY = 256     # tokens; nuclei are usually far smaller
_PROMPT_LOGITS_ROWS = 256    # lm_head rows computed at once for prompt logprobs: bounds memory


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw logits: before temperature and top_p) and
    the `num_top` most likely tokens at its position."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return _entry(logp, token_id, num_top)


def prompt_logprobs(hidden: torch.Tensor, lm_head, next_ids: list[int], num_top: int) -> list[TokenLogprob]:
    """Logprob of `next_ids[i]` given positions up to i, from final hidden states [T, H]
    (`lm_head` maps them to logits), a few hundred rows at a time."""
    out = []
    for start in range(0, len(next_ids), _PROMPT_LOGITS_ROWS):
        rows = torch.log_softmax(lm_head(hidden[start:start + _PROMPT_LOGITS_ROWS]).float(), dim=-1)
        out.extend(_entry(row, tok, num_top) for row, tok in zip(rows, next_ids[start:start + _PROMPT_LOGITS_ROWS]))
    return out


def _entry(logp: torch.Tensor, token_id: int, num_top: int) -> TokenLogprob:
    top = ()
    if num_top:
        values, ids = torch.topk(logp, num_top)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(logp[token_id]), top)


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None        # None: no logprobs; else alternatives per token (0-20)
    prompt_logprobs: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be <= max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs")


def sample_token(logits: torch.Tensor, params: SamplingConfig, step_index: int,
                 eos_token_ids: tuple[int, ...] = ()) -> int:
    """`step_index`: which output token this is (counting tokens from before a migration)."""
    logits = suppress_eos(logits, params, step_index, eos_token_ids)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed((params.seed * _STEP_MIX + step_index) & _SEED_MASK)
    else:
        gen.seed()
    if params.top_p >= 1.0:
        return _draw(probs, gen)
    nucleus, ids = _nucleus(probs, params.top_p)
    return int(ids[_draw(nucleus, gen)])


def suppress_eos(logits: torch.Tensor, params: SamplingConfig, step_index: int,
                 eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """The logits with end-of-sequence tokens ruled out while fewer than min_tokens are out."""
    if step_index < params.min_tokens and eos_token_ids and not params.ignore_eos:
        logits = logits.clone()
        logits[list(eos_token_ids)] = float("-inf")
    return logits


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose mass reaches `top_p` (always at least one):
    their probabilities, descending, and their ids. A partial sort of the most likely tokens
    usually holds it (a full sort of a 49k vocabulary takes ~3 ms on a CPU core); the whole
    vocabulary is sorted only when it does not."""
    top, ids = torch.topk(probs, min(_NUCLEUS_FIRST_TRY, probs.numel()))
    if top.numel() < probs.numel() and float(top.sum()) < top_p:
        top, ids = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(top, dim=-1) - top
    kept = max(1, int(torch.count_nonzero(mass_before < top_p)))
    return top[:kept], ids[:kept]


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """An index drawn with the (unnormalised) probabilities `probs`, by inverting their cumulative
    sum at one uniform number. torch.multinomial draws one random number per vocabulary entry,
    about 1 ms for a 49k vocabulary on a CPU core at every sampled token; this takes ~30 us. A
    token of probability 0 is never drawn: its cumulative sum equals its predecessor's."""
    cumulative = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    target = torch.rand(1, generator=gen, dtype=torch.float64) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, target, right=True))
    if index >= probs.numel():      # the product rounded up to the total
        index = int(torch.nonzero(probs)[-1])
    return index
