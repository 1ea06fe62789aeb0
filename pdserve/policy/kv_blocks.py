"""Block bookkeeping of a paged KV pool, with prefix caching; pure, no tensors (workers keep the
tensors in workers/kv_cache.py; the simulator runs the same bookkeeping for its prefix caches).

Every block is free, owned (reference count > 0: the requests whose tables list it), or cached
(count 0 but named by a prefix hash, kept for reuse and evicted least-recently-used when the pool
needs room). Named blocks are read-only: only full prompt blocks get a name, and a request writes
its own tokens only after its prompt, so a shared block is never written. The free count offered
to admission includes cached blocks, since they can be taken back at once.

Ownership: whoever allocated for a request id calls `free()` exactly once when it ends.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class OutOfKVBlocks(RuntimeError):
    pass


@dataclass
class PrefixStats:
    query_tokens: int = 0       # prompt tokens looked up (admissions and prefill lookups)
    hit_tokens: int = 0         # of those, found in the cache
    query_blocks: int = 0       # reusable full blocks looked up
    hit_blocks: int = 0
    evictions: int = 0
    stored_blocks: int = 0      # blocks that got a name (became reusable)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size_tokens: int, prefix_caching: bool = False,
                 max_pending_events: int = 4096):
        self.num_blocks = num_blocks
        self.block_size_tokens = block_size_tokens
        self.prefix_caching = prefix_caching
        self.stats = PrefixStats()
        self._free_block_ids = list(range(num_blocks - 1, -1, -1))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}          # named block -> its prefix hash
        self._block_of: dict[int, int] = {}         # prefix hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()    # cached, count 0; LRU first
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        self._num_cached: dict[str, int] = {}       # leading tokens a request linked from the cache
        # Stored/evicted names not yet published to the router; past the bound, a full snapshot.
        self._events: list[tuple[bool, int]] = []
        self._max_pending_events = max_pending_events
        self._events_overflowed = False

    # ---- capacity ----
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Named blocks, in use or not: what the prefix cache holds."""
        return len(self._block_of)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    def can_allocate(self, num_tokens: int, hashes: list[int] = ()) -> bool:
        matched = self._match(hashes)
        return self._new_blocks_needed(num_tokens, matched) <= self.num_free_blocks - self._num_evictable(matched)

    def _new_blocks_needed(self, num_tokens: int, matched: list[int]) -> int:
        return self.blocks_needed(num_tokens) - len(matched)

    def _num_evictable(self, blocks: list[int]) -> int:
        return sum(self._ref[b] == 0 for b in blocks)

    def _match(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `hashes`."""
        out = []
        if self.prefix_caching:
            for h in hashes:
                block = self._block_of.get(h)
                if block is None:
                    break
                out.append(block)
        return out

    # ---- allocation ----
    def allocate(self, req_id: str, num_tokens: int, hashes: list[int] = ()) -> int:
        """Blocks for `num_tokens`; the leading ones named in `hashes` are linked from the cache
        when held. Returns how many leading tokens are already there (a multiple of the block size)."""
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already holds KV blocks")
        matched = self._match(hashes)
        needed = self._new_blocks_needed(num_tokens, matched)
        if needed > self.num_free_blocks - self._num_evictable(matched):
            raise OutOfKVBlocks(f"need {needed} KV blocks, {self.num_free_blocks} free")
        for block in matched:
            self._ref[block] += 1
            self._evictable.pop(block, None)
        self._tables[req_id] = matched + [self._take() for _ in range(needed)]
        self._num_tokens[req_id] = num_tokens
        cached = self._num_cached[req_id] = len(matched) * self.block_size_tokens
        self._count_lookup(len(hashes), len(matched), num_tokens)
        return cached

    def _count_lookup(self, num_query_blocks: int, num_hit_blocks: int, num_tokens: int) -> None:
        if self.prefix_caching:
            self.stats.query_blocks += num_query_blocks
            self.stats.hit_blocks += num_hit_blocks
            self.stats.query_tokens += num_tokens
            self.stats.hit_tokens += num_hit_blocks * self.block_size_tokens

    def _take(self) -> int:
        if self._free_block_ids:
            block = self._free_block_ids.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._unname(block)
            self.stats.evictions += 1
        else:
            raise OutOfKVBlocks("no free KV block")
        self._ref[block] = 1
        return block

    def can_append(self, req_id: str) -> bool:
        return self._num_tokens[req_id] % self.block_size_tokens != 0 or self.num_free_blocks > 0

    def append_token(self, req_id: str) -> int:
        """Reserve room for one more token; returns its flat slot index."""
        pos = self._num_tokens[req_id]
        table = self._tables[req_id]
        if pos == len(table) * self.block_size_tokens:
            table.append(self._take())
        self._num_tokens[req_id] = pos + 1
        return self.slot(req_id, pos)

    def free(self, req_id: str) -> bool:
        """Return a request's blocks; False when it held none (idempotent for abort paths). Its
        named blocks stay cached, the deepest ones first in line for eviction."""
        table = self._tables.pop(req_id, None)
        self._num_tokens.pop(req_id, None)
        self._num_cached.pop(req_id, None)
        if table is None:
            return False
        for block in reversed(table):
            self._release_block(block)
        return True

    def _release_block(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] > 0:
            return
        if block in self._hash_of:
            self._evictable[block] = None
            self._evictable.move_to_end(block)
        else:
            self._free_block_ids.append(block)

    # ---- prefix cache ----
    def register(self, req_id: str, hashes: list[int]) -> None:
        """Name a request's leading full blocks once their KV is written (they become reusable)."""
        if not self.prefix_caching:
            return
        for block, h in zip(self._tables[req_id], hashes):
            if block not in self._hash_of and h not in self._block_of:
                self._name(block, h)

    def peek(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` are cached (no side effects)."""
        return len(self._match(hashes))

    def lookup(self, hashes: list[int], num_tokens: int) -> list[int]:
        """Blocks of the longest cached prefix of `hashes`, touched as recently used (a prefill
        worker reads them out; it links nothing)."""
        matched = self._match(hashes)
        for block in matched:
            if block in self._evictable:
                self._evictable.move_to_end(block)
        self._count_lookup(len(hashes), len(matched), num_tokens)
        return matched

    def store(self, hashes: list[int]) -> list[tuple[int, int]]:
        """Cache-only blocks for the names in `hashes` not held yet: (index in `hashes`, block),
        which the caller fills at once. Stops early when the pool has no block to spare."""
        if not self.prefix_caching:
            return []
        taken, mine = [], set()
        for i, h in enumerate(hashes):
            if h in self._block_of:
                continue
            if not self._free_block_ids and (not self._evictable or next(iter(self._evictable)) in mine):
                break       # never evict a block this call just filled
            block = self._take()
            mine.add(block)
            self._ref[block] = 0
            self._name(block, h)
            self._evictable[block] = None
            taken.append((i, block))
        return taken

    def _name(self, block: int, h: int) -> None:
        self._hash_of[block] = h
        self._block_of[h] = block
        self.stats.stored_blocks += 1
        self._event(True, h)

    def _unname(self, block: int) -> None:
        h = self._hash_of.pop(block)
        del self._block_of[h]
        self._event(False, h)

    def _event(self, stored: bool, h: int) -> None:
        if self._events_overflowed:
            return
        if len(self._events) >= self._max_pending_events:
            self._events_overflowed = True
            self._events.clear()
        else:
            self._events.append((stored, h))

    def drain_events(self, snapshot: bool = False) -> tuple[list[int], list[int], bool]:
        """(stored, evicted, reset) since the last drain; reset: `stored` is every name held (the
        backlog overflowed, or `snapshot` asked for it after a registration)."""
        if snapshot or self._events_overflowed:
            self._events.clear()
            self._events_overflowed = False
            return list(self._block_of), [], True
        final: dict[int, bool] = {}      # only the last event of a name counts
        for stored, h in self._events:
            final[h] = stored
        self._events = []
        return [h for h, s in final.items() if s], [h for h, s in final.items() if not s], False

    # ---- per request ----
    def slot(self, req_id: str, pos: int) -> int:
        block = self._tables[req_id][pos // self.block_size_tokens]
        return block * self.block_size_tokens + pos % self.block_size_tokens

    def table(self, req_id: str) -> list[int]:
        return self._tables[req_id]

    def num_tokens(self, req_id: str) -> int:
        return self._num_tokens[req_id]

    def num_cached_tokens(self, req_id: str) -> int:
        return self._num_cached.get(req_id, 0)

    def holds(self, req_id: str) -> bool:
        return req_id in self._tables

    def ref_count(self, block: int) -> int:
        return self._ref[block]
