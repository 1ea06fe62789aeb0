"""Gemma 3 forward pass, split into the same operators as Llama (see llama.py).

What differs from Llama, each checked against `transformers`' Gemma3ForCausalLM
(tests/unit/workers/test_gemma3_parity.py):
- embeddings scaled by sqrt(hidden_size); RMSNorm weights used as (1 + w) (folded in at load);
- RMSNorm of each head's query and key (q_norm, k_norm) before RoPE;
- norms after attention and after the MLP as well as before them ("sandwich" norms);
- GELU (tanh approximation) gating in the MLP;
- per layer either sliding-window attention (a token sees the `window` latest tokens, itself
  included) or full attention, each kind with its own RoPE base (local 10k, global 1M);
- the attention scale 1/sqrt(query_pre_attn_scalar), and an optional final logit soft cap.
The KV cache keeps every position for sliding layers too; the window is a mask, so prefix
caching, layer-wise transfer and preemption work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.workers.model.attention import attend_after_past
from pdserve.workers.model.config import ModelConfig
from pdserve.workers.model.llama import LlamaModel, rms_norm

# A sliding layer's queries attend in blocks of this many, so its mask and scores are at most
# this by this plus the window, however long the prompt.
SLIDING_QUERY_BLOCK_TOKENS = 512


@dataclass
class Gemma3LayerWeights:
    attn_norm: torch.Tensor          # every norm weight here is already (1 + w)
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    pre_mlp_norm: torch.Tensor
    post_mlp_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


@dataclass
class Gemma3Weights:
    embed: torch.Tensor
    layers: list[Gemma3LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def _rope_tables(theta: float, factor: float, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
    angles = torch.outer(torch.arange(config.max_position_tokens, dtype=torch.float64), inv_freq / factor)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


class Gemma3Model(LlamaModel):
    def __init__(self, config: ModelConfig, weights: Gemma3Weights):
        self.config = config
        self.weights = weights
        self._embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32)
        tables = {key: _rope_tables(*key, config) for key in set(zip(config.layer_rope_thetas,
                                                                      config.layer_rope_factors))}
        self._layer_rope = [tables[key] for key in zip(config.layer_rope_thetas, config.layer_rope_factors)]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.embed[token_ids] * self._embed_scale

    def _rope_at(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos_table, sin_table = self._layer_rope[layer]
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def qkv(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor):
        cfg, w = self.config, self.weights.layers[layer]
        x = rms_norm(hidden, w.attn_norm, cfg.rms_norm_eps)
        q = rms_norm((x @ w.wq.T).view(-1, cfg.num_heads, cfg.head_dim), w.q_norm, cfg.rms_norm_eps)
        k = rms_norm((x @ w.wk.T).view(-1, cfg.num_kv_heads, cfg.head_dim), w.k_norm, cfg.rms_norm_eps)
        v = (x @ w.wv.T).view(-1, cfg.num_kv_heads, cfg.head_dim)
        return self._rope_at(layer, q, positions), self._rope_at(layer, k, positions), v

    def attention_output(self, layer: int, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        w = self.weights.layers[layer]
        out = attn.reshape(attn.shape[0], -1) @ w.wo.T
        return hidden + rms_norm(out, w.post_attn_norm, self.config.rms_norm_eps)

    def attend_prompt(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      num_past: int) -> torch.Tensor:
        """q [N, H, D] over k, v [num_past + N, KV, D]. A full layer attends as Llama's do (the
        causal kernel, merged with any past); a sliding layer in blocks of queries, each over its
        window's keys only. One dense mask over the whole prompt, as before, held a T x T mask and
        a score matrix per head: 16 GB at Gemma 3's 32k context, for any prompt that long."""
        window = self.config.layer_windows[layer]
        if not window:
            return attend_after_past(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                     num_past=num_past, scale=self.config.attn_scale)[0].transpose(0, 1)
        blocks = []
        for start in range(num_past, k.shape[0], SLIDING_QUERY_BLOCK_TOKENS):
            stop = min(start + SLIDING_QUERY_BLOCK_TOKENS, k.shape[0])
            blocks.append(self._attend_window(q[start - num_past:stop - num_past], k, v, start, stop, window))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _attend_window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, end: int,
                       window: int) -> torch.Tensor:
        """Queries at positions [start, end) over the keys their window reaches."""
        first_key = max(0, start - window + 1)
        query_pos = torch.arange(start, end)[:, None]
        key_pos = torch.arange(first_key, end)[None, :]
        mask = (key_pos <= query_pos) & (query_pos - key_pos < window)
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], self._expand_kv(k[first_key:end].transpose(0, 1)[None]),
            self._expand_kv(v[first_key:end].transpose(0, 1)[None]), attn_mask=mask, scale=self.config.attn_scale,
        )[0].transpose(0, 1)

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        w, eps = self.weights.layers[layer], self.config.rms_norm_eps
        x = rms_norm(hidden, w.pre_mlp_norm, eps)
        out = (F.gelu(x @ w.w_gate.T, approximate="tanh") * (x @ w.w_up.T)) @ w.w_down.T
        return hidden + rms_norm(out, w.post_mlp_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().logits(hidden)
        if cap := self.config.final_logit_softcap:
            out = torch.tanh(out / cap) * cap
        return out

    def decode_attention(self, layer: int, hidden: torch.Tensor, q: torch.Tensor,
                         k_ctx: torch.Tensor, v_ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        # Context slots are positions 0..n-1 of each sequence; the new token is its last one.
        if window := self.config.layer_windows[layer]:
            last = ctx_mask.sum(dim=1, keepdim=True) - 1
            ctx_mask = ctx_mask & (last - torch.arange(ctx_mask.shape[1])[None, :] < window)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), self._expand_kv(k_ctx.permute(0, 2, 1, 3)), self._expand_kv(v_ctx.permute(0, 2, 1, 3)),
            attn_mask=ctx_mask[:, None, None, :], scale=self.config.attn_scale,
        ).squeeze(2)
        return self.attention_output(layer, hidden, out)


def weights_from_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> Gemma3Weights:
    """Hugging Face Gemma3ForCausalLM names; norm weights become (1 + w) here, once."""
    def get(key: str) -> torch.Tensor:
        return sd[key].float().contiguous()

    def norm(key: str) -> torch.Tensor:
        return 1.0 + get(key)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(Gemma3LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"), wq=get(p + "self_attn.q_proj.weight"),
            wk=get(p + "self_attn.k_proj.weight"), wv=get(p + "self_attn.v_proj.weight"),
            wo=get(p + "self_attn.o_proj.weight"), q_norm=norm(p + "self_attn.q_norm.weight"),
            k_norm=norm(p + "self_attn.k_norm.weight"), post_attn_norm=norm(p + "post_attention_layernorm.weight"),
            pre_mlp_norm=norm(p + "pre_feedforward_layernorm.weight"),
            post_mlp_norm=norm(p + "post_feedforward_layernorm.weight"),
            w_gate=get(p + "mlp.gate_proj.weight"), w_up=get(p + "mlp.up_proj.weight"),
            w_down=get(p + "mlp.down_proj.weight")))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in sd else get("lm_head.weight")
    return Gemma3Weights(embed=embed, layers=layers, final_norm=norm("model.norm.weight"), lm_head=lm_head)


def config_from_hf(cfg: dict, name: str) -> ModelConfig:
    """A `gemma3_text` config.json (the text model of Gemma 3)."""
    num_layers, num_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(num_layers)]
    rope = cfg.get("rope_parameters") or {}
    thetas, factors = [], []
    for kind in layer_types:
        params = rope.get(kind) or {}
        default_theta = cfg.get("rope_local_base_freq", 10000.0) if kind == "sliding_attention" else cfg.get(
            "rope_theta", 1000000.0)
        rope_type = params.get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            raise ValueError(f"unsupported RoPE type {rope_type!r} for Gemma 3 ({kind})")
        thetas.append(float(params.get("rope_theta") or default_theta))
        factors.append(float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0)
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        name=name, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=cfg.get("num_key_value_heads", num_heads), head_dim=cfg["head_dim"],
        intermediate_size=cfg["intermediate_size"], rope_theta=thetas[0], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_tokens=cfg.get("max_position_embeddings", 32768),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        architecture="gemma3",
        layer_windows=tuple(cfg["sliding_window"] if kind == "sliding_attention" else 0 for kind in layer_types),
        layer_rope_thetas=tuple(thetas), layer_rope_factors=tuple(factors),
        attn_scale=cfg.get("query_pre_attn_scalar", cfg["head_dim"]) ** -0.5,
        final_logit_softcap=cfg.get("final_logit_softcapping"))
