"""Causal attention of a prompt chunk that follows KV already computed (a cached prefix, or the
earlier chunks of a chunked prefill).

The chunk's N queries see all P earlier keys and their own N keys causally. A dense [N, P + N]
mask loses torch's causal kernel, which skips the masked half: on CPU a 3,266-token chunk after
a 48-token cached block took 2.3x the time of the same prompt computed cold, so a prefix-cache
hit of one block made a long prompt slower (bench prefix, 48 tokens per trace block: TTFT p99
x1.88 of no caching). Long chunks are therefore split in two softmaxes, over the past (no mask)
and over themselves (the causal kernel), then merged by their log-sum-exp, as FlashInfer and vLLM
merge attention states. Only the CPU flash kernel returns the log-sum-exp, so other devices, and a
torch without it, keep the dense mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this many new tokens the dense mask wastes less than a second kernel call and the merge
# cost (CPU, `python benchmarks/chunk_attention.py`: merged/dense x0.88-1.49 at 5-245 new tokens,
# x0.87 at 512, x0.41-0.43 at 3,266 after 48).
MERGE_MIN_TOKENS = 512

_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_after_past(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_past: int,
                      scale: float | None = None, merge: bool | None = None) -> torch.Tensor:
    """q [1, H, N, D]; k, v [1, KV, P + N, D] with H a multiple of KV (grouped-query attention:
    query head h reads KV head h // (H / KV)), the first `num_past` keys earlier than every
    query. Returns [1, H, N, D]. `merge` forces a path (tests, bench)."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    if num_past == 0:
        return F.scaled_dot_product_attention(q, _expand(k, group), _expand(v, group), is_causal=True, scale=scale)
    if merge is None:
        merge = n >= MERGE_MIN_TOKENS and q.device.type == "cpu" and _flash_with_lse is not None
    if not merge:
        mask = torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=num_past)
        out = F.scaled_dot_product_attention(_fold(q, group), k, v, attn_mask=mask.repeat(group, 1), scale=scale)
        return _unfold(out, group)
    over_past, lse_past = _flash_with_lse(_fold(q, group), k[:, :, :num_past], v[:, :, :num_past], 0.0, False,
                                          scale=scale)[:2]
    over_self, lse_self = _flash_with_lse(q, _expand(k[:, :, num_past:], group), _expand(v[:, :, num_past:], group),
                                          0.0, True, scale=scale)[:2]
    return merge_states(_unfold(over_past, group), _unfold(lse_past[..., None], group)[..., 0], over_self, lse_self)


# Queries of the heads that share a KV head are stacked into one longer query sequence of that
# head, so keys and values over a long past are read as they are instead of being copied once per
# query head (repeat_interleave). Causality is then a row-wise mask, which is why the causal
# kernel (no past, or a chunk's own keys) still takes expanded heads.
def _fold(q: torch.Tensor, group: int) -> torch.Tensor:
    """[1, H, N, D] -> [1, KV, group * N, D]."""
    b, h, n, d = q.shape
    return q if group == 1 else q.reshape(b, h // group, group * n, d)


def _unfold(x: torch.Tensor, group: int) -> torch.Tensor:
    """[1, KV, group * N, D] -> [1, H, N, D]."""
    b, kv, gn, d = x.shape
    return x if group == 1 else x.reshape(b, kv * group, gn // group, d)


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    """[1, KV, T, D] -> [1, H, T, D]. On CPU, SDPA's fused kernels need equal head counts
    (enable_gqa falls back to a path ~2x slower)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys A ∪ B from attention over A and over B: each output is weighted by its
    share of the total softmax mass, exp(lse_x - lse). out [.., N, D], lse [.., N]."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
