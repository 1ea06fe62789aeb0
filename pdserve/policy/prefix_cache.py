"""Prefix caching: block identity by hash chain, and the router's index of which worker holds what.

A full block of `block_size_tokens` prompt tokens is named by hash(parent block's hash, its token
ids): equal hashes mean equal prefixes up to and including that block, so a dict from hash to
holders is the radix tree of cached prefixes without the tree (a chain walk is a tree walk).
Workers and the router compute the same names from the same function.

`PrefixIndex` is the router's global view, fed by the workers' stored/evicted events on their
heartbeats. It can be stale: an entry whose block was evicted since costs a cache miss on the
worker (it computes more), never a wrong answer, because workers only reuse blocks they hold.
Pure: no I/O, no clock.
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Iterable, Iterator, Sequence

_ROOT = b"\0" * 8


def block_hashes(token_ids: Sequence[int], block_size_tokens: int, max_blocks: int | None = None) -> list[int]:
    """Hash chain of the full blocks of `token_ids` (a trailing partial block has no name)."""
    num_blocks = len(token_ids) // block_size_tokens
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    out, parent = [], _ROOT
    for i in range(num_blocks):
        tokens = array("I", token_ids[i * block_size_tokens:(i + 1) * block_size_tokens]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=8).digest()
        out.append(int.from_bytes(parent, "little"))
    return out


def chain_hashes(block_ids: Sequence[int]) -> list[int]:
    """Prefix names for blocks already identified one by one (a trace's per-block hash ids):
    the same chain, so that equal names still mean equal prefixes."""
    out, parent = [], _ROOT
    for block_id in block_ids:
        parent = hashlib.blake2b(parent + int(block_id).to_bytes(16, "little", signed=True), digest_size=8).digest()
        out.append(int.from_bytes(parent, "little"))
    return out


def reusable_blocks(num_prompt_tokens: int, block_size_tokens: int) -> int:
    """Leading blocks a prefill may take from a cache: the last prompt token is always computed,
    because its logits give the first output token."""
    return max(0, (num_prompt_tokens - 1) // block_size_tokens)


def infinite_cache_hits(prompts: Iterable[tuple[Sequence[int], int]], block_size_tokens: int) -> Iterator[int]:
    """Per prompt (given in arrival order as (block names, prompt tokens)), the tokens that one
    cache that never evicts and saw every earlier prompt would serve."""
    seen: set[int] = set()
    for hashes, num_tokens in prompts:
        reusable = hashes[:reusable_blocks(num_tokens, block_size_tokens)]
        yield next((i for i, h in enumerate(reusable) if h not in seen), len(reusable)) * block_size_tokens
        seen.update(hashes[:num_tokens // block_size_tokens])


def infinite_cache_hit_rate(prompts: Iterable[tuple[Sequence[int], int]], block_size_tokens: int) -> float:
    """Upper bound of a prefix hit rate: the share of prompt tokens `infinite_cache_hits` serves."""
    prompts = list(prompts)
    total = sum(num_tokens for _, num_tokens in prompts)
    return sum(infinite_cache_hits(prompts, block_size_tokens)) / total if total else 0.0


class PrefixIndex:
    """Which workers hold which blocks (router side). O(blocks in the prompt + holders) per query."""

    def __init__(self, max_blocks_per_worker: int = 1 << 20):
        self._holders: dict[int, set[str]] = {}
        self._held: dict[str, set[int]] = {}
        self.max_blocks_per_worker = max_blocks_per_worker

    def apply(self, worker_id: str, stored: Iterable[int], evicted: Iterable[int], reset: bool = False) -> None:
        """Fold in one worker's events. `reset`: `stored` is its whole cache (after a restart, a
        re-registration or an event backlog it dropped)."""
        if reset:
            self.forget(worker_id)
        held = self._held.setdefault(worker_id, set())
        for h in evicted:
            if h in held:
                held.discard(h)
                self._drop(h, worker_id)
        for h in stored:
            if h not in held and len(held) < self.max_blocks_per_worker:
                held.add(h)
                self._holders.setdefault(h, set()).add(worker_id)

    def forget(self, worker_id: str) -> None:
        """A worker left (or restarted): none of its blocks are known any more."""
        for h in self._held.pop(worker_id, ()):
            self._drop(h, worker_id)

    def _drop(self, h: int, worker_id: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]

    def overlaps(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per worker, how many leading blocks of `hashes` it holds (workers with none omitted)."""
        matched: dict[str, int] = {}
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            extended = False
            for w in holders:
                if matched.get(w, 0) == i:
                    matched[w] = i + 1
                    extended = True
            if not extended:
                break
        return matched

    def num_blocks(self, worker_id: str | None = None) -> int:
        if worker_id is not None:
            return len(self._held.get(worker_id, ()))
        return len(self._holders)

    def num_entries(self) -> int:
        return sum(len(h) for h in self._held.values())
