"""Llama-family forward pass (RMSNorm, RoPE, GQA attention, SwiGLU MLP) split into operators.

A prefill runs as a sequence of operators: for each layer, ATTENTION then MLP. `PrefillExecution`
(see execution.py) steps through them one at a time, so a scheduler can stop between any two
operators and resume later without recomputing anything; the K/V of a layer exists as soon as its
ATTENTION operator returns and can be handed to the KV transfer layer right away.
Decode runs one token for a batch of sequences whose KV lives in the paged cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.workers.model.attention import attend_after_past
from pdserve.workers.model.config import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


@dataclass
class LlamaWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def random_weights(config: ModelConfig, seed: int) -> LlamaWeights:
    """Seeded random weights, scaled so activations stay O(1) through the depth."""
    gen = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    layers = [
        LayerWeights(
            attn_norm=norm(h), wq=mat(config.num_heads * config.head_dim, h), wk=mat(kv, h),
            wv=mat(kv, h), wo=mat(h, config.num_heads * config.head_dim), mlp_norm=norm(h),
            w_gate=mat(config.intermediate_size, h), w_up=mat(config.intermediate_size, h),
            w_down=mat(h, config.intermediate_size),
        )
        for _ in range(config.num_layers)
    ]
    embed = torch.randn(config.vocab_size, h, generator=gen)
    lm_head = embed if config.tie_word_embeddings else mat(config.vocab_size, h) * 4.0
    return LlamaWeights(embed=embed, layers=layers, final_norm=norm(h), lm_head=lm_head)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * weight


class LlamaModel:
    """Stateless operators over fixed weights; all per-request state lives in the caller."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights):
        self.config = config
        self.weights = weights
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
        )
        angles = torch.outer(torch.arange(config.max_position_tokens, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos = angles.cos().float()
        self._sin = angles.sin().float()

    def _expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, KV, T, D] -> [B, H, T, D]. Explicit GQA expansion: on CPU, SDPA's fused kernels need
        4-D inputs with equal head counts (enable_gqa falls back to a path ~2x slower)."""
        group = self.config.num_heads // self.config.num_kv_heads
        return x if group == 1 else x.repeat_interleave(group, dim=1)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.embed[token_ids]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]; rotate-half convention, as Hugging Face Llama.
        cos = self._cos[positions].unsqueeze(1)
        sin = self._sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        """Projections of one layer for tokens at `positions`: q [T,H,D], k and v [T,KV,D]."""
        cfg, w = self.config, self.weights.layers[layer]
        x = rms_norm(hidden, w.attn_norm, cfg.rms_norm_eps)
        q = (x @ w.wq.T).view(-1, cfg.num_heads, cfg.head_dim)
        k = (x @ w.wk.T).view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = (x @ w.wv.T).view(-1, cfg.num_kv_heads, cfg.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def attention_output(self, layer: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output projection; attn: [T, H, D]."""
        return hidden + attn.reshape(attn.shape[0], -1) @ self.weights.layers[layer].wo.T

    def prefill_attention(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
        past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ATTENTION operator for a chunk of prompt tokens; returns (hidden, k_chunk, v_chunk).

        past_k/past_v ([P, KV, D]) hold KV of earlier chunks of the same prompt, so a prompt can be
        prefilled in pieces; the chunk attends causally to them and to itself.
        """
        q, k, v = self.qkv(layer, hidden, positions)
        full_k = k if past_k is None else torch.cat([past_k, k], dim=0)
        full_v = v if past_v is None else torch.cat([past_v, v], dim=0)
        out = self.attend_prompt(layer, q, full_k, full_v, num_past=full_k.shape[0] - k.shape[0])
        return self.attention_output(layer, hidden, out), k, v

    def prefill_attention_into(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, state,
                               start: int) -> torch.Tensor:
        """ATTENTION operator for the chunk of `state`'s prompt (a JobState) from token `start` on:
        its K/V are written into the prompt's layer buffer, whose first `start` positions hold the
        earlier chunks (or a cached prefix), and the chunk attends over the buffer in place."""
        q, k, v = self.qkv(layer, hidden, positions)
        kv = state.layer_buffer(layer, k)
        end = start + k.shape[0]
        kv[0, start:end] = k
        kv[1, start:end] = v
        out = self.attend_prompt(layer, q, kv[0, :end], kv[1, :end], num_past=start)
        return self.attention_output(layer, hidden, out)

    def attend_prompt(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      num_past: int) -> torch.Tensor:
        """q [N, H, D] of a prompt chunk over k, v [num_past + N, KV, D]; returns [N, H, D]."""
        out = attend_after_past(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                num_past=num_past)
        return out[0].transpose(0, 1)

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """MLP operator (SwiGLU) with its residual add."""
        w = self.weights.layers[layer]
        x = rms_norm(hidden, w.mlp_norm, self.config.rms_norm_eps)
        return hidden + (F.silu(x @ w.w_gate.T) * (x @ w.w_up.T)) @ w.w_down.T

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = rms_norm(hidden, self.weights.final_norm, self.config.rms_norm_eps)
        return x @ self.weights.lm_head.T

    def decode_attention(
        self, layer: int, hidden: torch.Tensor, q: torch.Tensor,
        k_ctx: torch.Tensor, v_ctx: torch.Tensor, ctx_mask: torch.Tensor,
    ) -> torch.Tensor:
        """ATTENTION for one new token per sequence over gathered, padded context.

        hidden [B, hidden]; q [B, H, D] from `qkv`; k_ctx/v_ctx [B, C, KV, D] already hold the new
        token's KV; ctx_mask [B, C] is True where a context slot is real.
        """
        # The query heads of a KV head attend as one group ([B, KV, G, D] queries), so the gathered
        # context is read once instead of copied per query head.
        b, kv_heads = q.shape[0], self.config.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(b, kv_heads, -1, q.shape[-1]),
            k_ctx.permute(0, 2, 1, 3), v_ctx.permute(0, 2, 1, 3),
            attn_mask=ctx_mask[:, None, None, :],
        )
        return self.attention_output(layer, hidden, out.reshape(b, -1, q.shape[-1]))
