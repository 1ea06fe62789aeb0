"""Architecture description of a model the runner executes: Llama-family (Llama, Mistral, Qwen2,
SmolLM2) or Gemma 3 (`architecture="gemma3"`, with per-layer sliding windows and RoPE bases)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_tokens: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str = "llama"
    # Gemma 3: per layer, the sliding window in tokens (0: full attention), the RoPE base and
    # its linear scaling factor; the attention scale; the final logits' soft cap (None: none).
    layer_windows: tuple[int, ...] = ()
    layer_rope_thetas: tuple[float, ...] = ()
    layer_rope_factors: tuple[float, ...] = ()
    attn_scale: float | None = None
    final_logit_softcap: float | None = None

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        # K and V, float32 (the runner computes in float32 on CPU for exactness).
        return 2 * self.num_kv_heads * self.head_dim * 4

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_per_layer


def tiny_config(num_layers: int = 4) -> ModelConfig:
    """A small random-initialised model: byte-level vocabulary, GQA with 2 query heads per KV head."""
    from pdserve.workers.model.tokenizer import ByteTokenizer

    return ModelConfig(
        name="tiny",
        vocab_size=ByteTokenizer.VOCAB_SIZE,
        hidden_size=256,
        num_layers=num_layers,
        num_heads=8,
        num_kv_heads=4,
        head_dim=32,
        intermediate_size=688,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_tokens=4096,
        tie_word_embeddings=False,
        bos_token_id=ByteTokenizer.BOS_ID,
        eos_token_ids=(ByteTokenizer.EOS_ID,),
    )


def tiny_large_config() -> ModelConfig:
    """Twice tiny's depth and width, same byte vocabulary: the 'large' model of IC-Cache's tests
    (a pair of served models that share a tokenizer)."""
    import dataclasses
    return dataclasses.replace(tiny_config(num_layers=8), name="tiny-large", hidden_size=512, num_heads=16,
                               num_kv_heads=8, intermediate_size=1376)
