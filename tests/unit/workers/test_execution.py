"""Operator-level stepping: preemption between operators loses nothing and recomputes nothing."""
import torch

from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import OperatorKind, PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.tokenizer import ByteTokenizer


def _tiny() -> LoadedModel:
    cfg = tiny_config()
    return LoadedModel("tiny", LlamaModel(cfg, random_weights(cfg, 0)), ByteTokenizer())


def test_operators_alternate_and_each_attention_yields_its_layer_kv():
    m = _tiny().model
    ex = PrefillExecution(m, list(range(30)))
    kinds = []
    while not ex.done:
        op = ex.step()
        kinds.append((op.layer, op.kind))
        if op.kind is OperatorKind.ATTENTION:
            assert op.layer_kv.shape == (2, 30, m.config.num_kv_heads, m.config.head_dim)
            assert op.layer_kv.is_contiguous()
    assert kinds == [(i // 2, OperatorKind.ATTENTION if i % 2 == 0 else OperatorKind.MLP)
                     for i in range(2 * m.config.num_layers)]


def test_preempted_prefill_resumes_bit_exact():
    m = _tiny().model
    long_ids, short_ids = list(range(200)), list(range(50, 70))
    reference = PrefillExecution(m, long_ids)
    ref_logits = reference.run_to_end()
    interrupted = PrefillExecution(m, long_ids)
    for _ in range(3):          # stop after layer 1's attention ...
        interrupted.step()
    PrefillExecution(m, short_ids).run_to_end()   # ... an urgent request runs to completion ...
    got_logits = interrupted.run_to_end()        # ... then the long one resumes where it stopped
    assert torch.equal(got_logits, ref_logits)
    for a, b in zip(interrupted.layer_kv, reference.layer_kv):
        assert torch.equal(a, b)


def test_chunked_attention_matches_whole_prompt():
    m = _tiny().model
    ids = torch.arange(40)
    h = m.embed(ids)
    whole, k, v = m.prefill_attention(0, h, torch.arange(40))
    first, k1, v1 = m.prefill_attention(0, h[:25], torch.arange(25))
    second, _, _ = m.prefill_attention(0, h[25:], torch.arange(25, 40), past_k=k1, past_v=v1)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_a_long_chunk_after_a_prefix_matches_the_whole_prompt():
    """Chunks of MERGE_MIN_TOKENS or more take the merged-softmax path (attention.py)."""
    m = _tiny().model
    ids = torch.arange(700) % 250
    h = m.embed(ids)
    whole, _, _ = m.prefill_attention(0, h, torch.arange(700))
    first, k1, v1 = m.prefill_attention(0, h[:100], torch.arange(100))
    second, _, _ = m.prefill_attention(0, h[100:], torch.arange(100, 700), past_k=k1, past_v=v1)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)
