"""Block naming and the router's index of which worker holds which prefix."""
from pdserve.policy.prefix_cache import PrefixIndex, block_hashes, reusable_blocks


def test_equal_prefixes_have_equal_names_and_a_difference_changes_every_later_name():
    a = block_hashes(list(range(40)), 8)
    b = block_hashes(list(range(16)) + [99] + list(range(17, 40)), 8)
    assert len(a) == 5 and a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:]))
    assert block_hashes(list(range(39)), 8) == a[:4]           # a partial block has no name
    assert block_hashes([1, 2], 8) == [] and block_hashes(list(range(40)), 8, max_blocks=2) == a[:2]
    assert reusable_blocks(40, 8) == 4 and reusable_blocks(41, 8) == 5 and reusable_blocks(1, 8) == 0


def test_overlaps_count_leading_blocks_only():
    h = block_hashes(list(range(64)), 8)
    index = PrefixIndex()
    index.apply("w1", h[:5], [])
    index.apply("w2", h[:2] + h[3:6], [])                      # a hole at block 2
    index.apply("w3", h[4:], [])                               # no root: useless
    assert index.overlaps(h) == {"w1": 5, "w2": 2}
    index.apply("w1", [], h[1:2])                              # evicted: w1 now stops at block 1
    assert index.overlaps(h) == {"w1": 1, "w2": 2}
    index.apply("w2", h[:1], [], reset=True)                   # a snapshot replaces what was known
    assert index.overlaps(h) == {"w1": 1, "w2": 1}
    index.forget("w1")
    assert index.overlaps(h) == {"w2": 1} and index.num_blocks("w1") == 0
    assert index.num_entries() == 1 + len(h[4:])


def test_a_worker_is_capped_at_its_block_budget():
    index = PrefixIndex(max_blocks_per_worker=3)
    index.apply("w", block_hashes(list(range(80)), 8), [])
    assert index.num_blocks("w") == 3


def test_an_infinite_cache_serves_each_prompt_the_leading_blocks_an_earlier_one_had():
    from pdserve.policy.prefix_cache import infinite_cache_hit_rate, infinite_cache_hits
    a, b, c = [1, 2, 3], [1, 2, 9], [5, 2, 3]           # block names, 4 tokens a block
    prompts = [(a, 12), (b, 12), (c, 12), (a, 13), (a, 12)]
    # b shares a's first two blocks; c shares no leading block; a again: every full block, except
    # that the block holding a prompt's last token is never served (its logits are needed).
    assert list(infinite_cache_hits(prompts, 4)) == [0, 8, 0, 12, 8]
    assert infinite_cache_hit_rate(prompts, 4) == 28 / 61
