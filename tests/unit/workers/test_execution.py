"""Operator-level stepping: preemption between operators loses nothing and recomputes nothing."""
import pytest
import torch

from pdserve.policy.prefill_scheduler import Piece, PrefillJob, WorkUnit
from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import OperatorKind, PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.tokenizer import ByteTokenizer
from pdserve.workers.model.unit_execution import CachedPrefix, JobState, UnitExecution


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


def test_decode_attention_groups_queries_by_kv_head():
    """One token per sequence over padded context: equals attention with the KV heads expanded
    per query head and the padding masked out."""
    m = _tiny().model
    cfg = m.config
    gen = torch.Generator().manual_seed(5)
    b, ctx = 3, 17
    hidden = torch.randn(b, cfg.hidden_size, generator=gen)
    q = torch.randn(b, cfg.num_heads, cfg.head_dim, generator=gen)
    k, v = torch.randn(2, b, ctx, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    mask = torch.ones(b, ctx, dtype=torch.bool)
    mask[1, 9:] = False
    group = cfg.num_heads // cfg.num_kv_heads
    scores = torch.einsum("bhd,bchd->bhc", q, k.repeat_interleave(group, dim=2)) * cfg.head_dim ** -0.5
    weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    attn = torch.einsum("bhc,bchd->bhd", weights, v.repeat_interleave(group, dim=2))
    expected = hidden + attn.reshape(b, -1) @ m.weights.layers[0].wo.T
    torch.testing.assert_close(m.decode_attention(0, hidden, q, k, v, mask), expected, rtol=1e-4, atol=1e-5)


def _run_piece(model, state, start: int, num_tokens: int) -> list:
    job = PrefillJob(state.req_id, len(state.token_ids), 0.0, 1.0, num_tokens_done=start)
    unit = WorkUnit([Piece(job, start, num_tokens)], model.config.num_layers)
    execution, ready = UnitExecution(model, unit, {state.req_id: state}), []
    while not unit.finished:
        ready += execution.run_operator()
        unit.next_op += 1
    return ready


def test_a_prompt_in_chunks_after_a_cached_prefix_fills_one_buffer_per_layer():
    """Prefix, then two chunks: each layer's KV is written in place into the prompt's buffer, which
    is what the layer reports when it is complete (no concatenation, no copy)."""
    m = _tiny().model
    ids = [(i * 7) % 250 for i in range(90)]
    ref = PrefillExecution(m, ids)
    ref_logits = ref.run_to_end()
    state = JobState("r", ids)
    state.seed(CachedPrefix.of([kv[:, :30] for kv in ref.layer_kv], len(ids)))
    assert _run_piece(m, state, 30, 40) == []
    ready = _run_piece(m, state, 70, 20)
    assert [r.layer for r in ready] == list(range(m.config.num_layers))
    for r in ready:
        assert r.kv is state.kv[r.layer] and r.kv.is_contiguous()
        torch.testing.assert_close(r.kv, ref.layer_kv[r.layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_a_piece_that_does_not_continue_the_layers_kv_is_refused():
    m = _tiny().model
    state = JobState("r", list(range(50)))
    _run_piece(m, state, 0, 20)
    with pytest.raises(RuntimeError, match="holds 20 tokens"):
        _run_piece(m, state, 25, 25)
