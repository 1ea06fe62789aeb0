import pytest
import torch

from pdserve.workers.kv_cache import BlockAllocator, OutOfKVBlocks, PagedKVCache
from pdserve.workers.model.config import tiny_config


def test_allocate_append_free_roundtrip():
    a = BlockAllocator(num_blocks=4, block_size_tokens=4)
    assert a.can_allocate(16) and not a.can_allocate(17)
    a.allocate("x", 7)
    assert a.num_free_blocks == 2
    a.append_token("x")                 # 8th token fits the second block
    assert a.num_free_blocks == 2
    a.append_token("x")                 # 9th token needs a third block
    assert a.num_free_blocks == 1 and a.num_tokens("x") == 9
    with pytest.raises(ValueError):
        a.allocate("x", 1)
    with pytest.raises(OutOfKVBlocks):
        a.allocate("y", 5)
    assert a.free("x") and not a.free("x")
    assert a.num_free_blocks == 4


def test_import_export_roundtrip_through_scattered_blocks():
    cfg = tiny_config()
    alloc = BlockAllocator(num_blocks=8, block_size_tokens=4)
    cache = PagedKVCache(cfg, alloc)
    alloc.allocate("other", 5)          # so "x" gets non-contiguous, non-zero block ids
    alloc.allocate("x", 10)
    kv = torch.randn(2, 10, cfg.num_kv_heads, cfg.head_dim)
    cache.import_layer("x", 2, kv)
    assert torch.equal(cache.export_layer("x", 2), kv)
    slots, mask = cache.context_slots(["x", "other"])
    assert mask.sum().item() == 15


def test_blocks_gathered_into_a_longer_prompt_buffer_hold_their_kv_in_order():
    cfg = tiny_config()
    alloc = BlockAllocator(num_blocks=8, block_size_tokens=4)
    cache = PagedKVCache(cfg, alloc)
    alloc.allocate("other", 5)
    alloc.allocate("x", 12)
    layers = [torch.randn(2, 12, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    for layer, kv in enumerate(layers):
        cache.import_layer("x", layer, kv)
    table = alloc.table("x")
    got = cache.gather_blocks([table[2], table[0]], num_tokens=11)     # out of order, into 11 positions
    for layer, kv in enumerate(layers):
        assert got[layer].shape == (2, 11, cfg.num_kv_heads, cfg.head_dim) and got[layer].is_contiguous()
        assert torch.equal(got[layer][:, :4], kv[:, 8:12]) and torch.equal(got[layer][:, 4:8], kv[:, :4])
