"""The block allocator's prefix cache: reuse, LRU eviction and its invariants under random use."""
import random

import pytest

from pdserve.policy.prefix_cache import block_hashes
from pdserve.policy.kv_blocks import BlockAllocator, OutOfKVBlocks

BS = 4


def test_a_freed_prompt_stays_cached_and_is_linked_by_the_next_one():
    alloc = BlockAllocator(8, BS, prefix_caching=True)
    ids = list(range(10))
    hashes = block_hashes(ids, BS)                    # 2 full blocks
    assert alloc.allocate("a", 10, hashes) == 0
    alloc.register("a", hashes)
    alloc.free("a")
    assert alloc.num_free_blocks == 8 and alloc.num_cached_blocks == 2
    assert alloc.allocate("b", 10, hashes) == 2 * BS
    assert alloc.table("b")[:2] == [alloc._block_of[h] for h in hashes]
    assert alloc.num_free_blocks == 8 - 3


def test_eviction_takes_the_least_recently_used_unreferenced_block_and_never_a_held_one():
    alloc = BlockAllocator(4, BS, prefix_caching=True)
    a, b = block_hashes(list(range(8)), BS), block_hashes(list(range(100, 108)), BS)
    alloc.allocate("a", 8, a)
    alloc.register("a", a)
    alloc.allocate("b", 8, b)
    alloc.register("b", b)
    alloc.free("a")                                    # a's blocks cached, b's held
    assert alloc.allocate("c", 4) == 0                 # takes a cached block: a's deepest first
    assert alloc.stats.evictions == 1
    alloc.free("c")
    assert alloc.allocate("a2", 8, a) == BS            # a's first block is still there
    with pytest.raises(OutOfKVBlocks):
        alloc.allocate("d", 4)                         # the rest is referenced: nothing to evict
    assert alloc.num_cached_blocks == 3                # b's two and a's first


def test_events_report_the_final_state_of_each_name_and_a_snapshot_after_overflow():
    alloc = BlockAllocator(2, BS, prefix_caching=True, max_pending_events=3)
    h = block_hashes(list(range(8)), BS)
    alloc.store(h)
    assert alloc.drain_events() == (h, [], False)
    alloc.allocate("x", 8)                             # evicts both
    assert alloc.drain_events() == ([], h, False)
    alloc.free("x")
    for _ in range(3):
        alloc.store(h)
        alloc.allocate("y", 8)
        alloc.free("y")
    stored, evicted, reset = alloc.drain_events()
    assert reset and stored == [] and evicted == []    # overflowed: the full (empty) cache instead


def _check_invariants(alloc: BlockAllocator, tables: dict[str, list[int]]) -> None:
    refs = [0] * alloc.num_blocks
    for table in tables.values():
        for block in table:
            refs[block] += 1
    assert refs == [alloc.ref_count(b) for b in range(alloc.num_blocks)]
    free, evictable = set(alloc._free_block_ids), set(alloc._evictable)
    assert not free & evictable
    assert all(refs[b] == 0 for b in free | evictable)          # eviction only ever finds count 0
    assert all(b in alloc._hash_of for b in evictable)
    assert len(free) + len(evictable) + sum(r > 0 for r in refs) == alloc.num_blocks
    assert {alloc._block_of[h]: h for h in alloc._block_of} == alloc._hash_of


@pytest.mark.parametrize("seed", range(20))
def test_random_use_keeps_every_invariant(seed):
    rng = random.Random(seed)
    alloc = BlockAllocator(24, BS, prefix_caching=True)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 30))] for _ in range(6)]
    tables: dict[str, list[int]] = {}
    for step in range(300):
        op = rng.random()
        if op < 0.5:
            ids = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]
            hashes = block_hashes(ids, BS, max(0, (len(ids) - 1) // BS))
            req = f"r{step}"
            try:
                cached = alloc.allocate(req, len(ids), hashes)
            except OutOfKVBlocks:
                continue
            assert cached % BS == 0 and cached <= len(ids) - 1
            alloc.register(req, block_hashes(ids, BS))
            tables[req] = list(alloc.table(req))
        elif op < 0.65:
            alloc.store(block_hashes(rng.choice(prefixes), BS))
        elif tables:
            req = rng.choice(sorted(tables))
            if rng.random() < 0.3 and alloc.can_append(req):
                alloc.append_token(req)
                tables[req] = list(alloc.table(req))
            else:
                alloc.free(req)
                del tables[req]
        _check_invariants(alloc, tables)
