"""A chunk's attention after earlier KV: the merged-softmax path equals the dense mask, and the
model takes it only where it pays (long chunks on CPU)."""
import pytest
import torch
import torch.nn.functional as F

from pdserve.workers.model import attention
from pdserve.workers.model.attention import MERGE_MIN_TOKENS, attend_after_past, merge_states


def _inputs(new: int, past: int, heads: int = 8, dim: int = 32, seed: int = 0, kv_heads: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, new, dim, generator=gen)
    k, v = torch.randn(2, 1, kv_heads or heads, past + new, dim, generator=gen)
    return q, k, v


def _reference(q, k, v, past: int, scale=None):
    """Plain softmax attention, each query seeing the past and its own prefix of the chunk."""
    new = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    allowed = torch.ones(new, past + new, dtype=torch.bool).tril(diagonal=past)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("new,past", [(1, 1), (7, 50), (600, 1), (600, 700), (33, 2000)])
@pytest.mark.parametrize("merge", [False, True])
def test_both_paths_equal_plain_softmax_attention(new, past, merge):
    q, k, v = _inputs(new, past, seed=new + past)
    got = attend_after_past(q, k, v, past, merge=merge)
    torch.testing.assert_close(got, _reference(q, k, v, past), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("new,past", [(1, 1), (7, 50), (600, 1), (600, 700)])
@pytest.mark.parametrize("merge", [False, True])
def test_grouped_query_heads_read_their_kv_head(new, past, merge):
    """Query head h of 8 sees KV head h // 2 of 4, on every path (the past path stacks each
    group's queries instead of copying the KV per query head)."""
    q, k, v = _inputs(new, past, seed=new + past, kv_heads=4)
    got = attend_after_past(q, k, v, past, merge=merge)
    expanded = [x.repeat_interleave(2, dim=1) for x in (k, v)]
    torch.testing.assert_close(got, _reference(q, *expanded, past), rtol=1e-4, atol=1e-5)
    if past:    # the queries of head 1 differ from head 0's: swapping KV heads must show
        swapped = [x[:, [1, 0, 2, 3]] for x in (k, v)]
        assert not torch.allclose(attend_after_past(q, *swapped, past, merge=merge), got, atol=1e-3)


def test_an_explicit_scale_is_honoured_on_the_merged_path():
    q, k, v = _inputs(20, 30)
    got = attend_after_past(q, k, v, 30, scale=0.05, merge=True)
    torch.testing.assert_close(got, _reference(q, k, v, 30, scale=0.05), rtol=1e-4, atol=1e-5)


def test_no_past_is_plain_causal_attention():
    q, k, v = _inputs(40, 0)
    torch.testing.assert_close(attend_after_past(q, k, v, 0), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_merging_two_halves_of_the_keys_equals_attending_to_all():
    q, k, v = _inputs(5, 64)
    k, v = k[:, :, :64], v[:, :, :64]
    halves = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k[:, :, s], v[:, :, s], 0.0, False)[:2]
              for s in (slice(0, 20), slice(20, 64))]
    merged = merge_states(halves[0][0], halves[0][1], halves[1][0], halves[1][1])
    torch.testing.assert_close(merged, F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = attention._flash_with_lse

    def spy(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)
    monkeypatch.setattr(attention, "_flash_with_lse", spy)
    return calls


def test_long_chunks_merge_and_short_ones_keep_the_mask(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    attend_after_past(*_inputs(MERGE_MIN_TOKENS - 1, 16), 16)
    assert calls == []
    attend_after_past(*_inputs(MERGE_MIN_TOKENS, 16), 16)
    assert calls == [MERGE_MIN_TOKENS, MERGE_MIN_TOKENS]      # past, then the chunk itself


def test_a_torch_without_the_kernel_falls_back_to_the_mask(monkeypatch):
    monkeypatch.setattr(attention, "_flash_with_lse", None)
    q, k, v = _inputs(MERGE_MIN_TOKENS, 16)
    torch.testing.assert_close(attend_after_past(q, k, v, 16), _reference(q, k, v, 16), rtol=1e-4, atol=1e-5)
