"""Our operator-by-operator forward pass matches transformers' LlamaForCausalLM on the same weights."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.model.loader import SMOLLM2_NAME, load_model, smollm2_hf_dir


def _hf_from_ours(model: LlamaModel) -> LlamaForCausalLM:
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_tokens, tie_word_embeddings=False))
    w = model.weights
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm, "lm_head.weight": w.lm_head}
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": lw.attn_norm, p + "self_attn.q_proj.weight": lw.wq,
                   p + "self_attn.k_proj.weight": lw.wk, p + "self_attn.v_proj.weight": lw.wv,
                   p + "self_attn.o_proj.weight": lw.wo, p + "post_attention_layernorm.weight": lw.mlp_norm,
                   p + "mlp.gate_proj.weight": lw.w_gate, p + "mlp.up_proj.weight": lw.w_up,
                   p + "mlp.down_proj.weight": lw.w_down})
    hf.load_state_dict(sd)
    return hf.eval()


def _our_logits_all_positions(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    # Last-position logits of every prefix equal the full causal forward's per-position logits.
    return torch.stack([PrefillExecution(model, ids[: n + 1]).run_to_end() for n in range(len(ids))])


def test_tiny_matches_transformers():
    cfg = tiny_config()
    ours = LlamaModel(cfg, random_weights(cfg, seed=3))
    hf = _hf_from_ours(ours)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = _our_logits_all_positions(ours, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_matches_transformers(model_cache_dir):
    loaded = load_model(SMOLLM2_NAME, model_cache_dir)
    hf_dir = smollm2_hf_dir(model_cache_dir)
    assert json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"] == 30
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime number."}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    got = PrefillExecution(loaded.model, ids).run_to_end()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert int(got.argmax()) == int(ref.argmax())
