"""Paged KV cache for decode plus contiguous per-layer export/import for transfer.

Ownership: `BlockAllocator` hands out fixed-size blocks to a request id; whoever allocated must
call `free()` exactly once when the request finishes, fails or is aborted. `PagedKVCache` holds the
tensors; it never allocates blocks itself. A transferred layer arrives as one contiguous
[2, T, KV, D] buffer and is scattered into the request's blocks by `import_layer`.
"""
from __future__ import annotations

import torch

from pdserve.workers.model.config import ModelConfig


class OutOfKVBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Free-list allocator; pure bookkeeping, no tensors."""

    def __init__(self, num_blocks: int, block_size_tokens: int):
        self.num_blocks = num_blocks
        self.block_size_tokens = block_size_tokens
        self._free_block_ids = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_free_blocks

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already holds KV blocks")
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free_blocks:
            raise OutOfKVBlocks(f"need {needed} KV blocks, {self.num_free_blocks} free")
        self._tables[req_id] = [self._free_block_ids.pop() for _ in range(needed)]
        self._num_tokens[req_id] = num_tokens
        return self._tables[req_id]

    def can_append(self, req_id: str) -> bool:
        return self._num_tokens[req_id] % self.block_size_tokens != 0 or self.num_free_blocks > 0

    def append_token(self, req_id: str) -> int:
        """Reserve room for one more token; returns its flat slot index."""
        pos = self._num_tokens[req_id]
        table = self._tables[req_id]
        if pos == len(table) * self.block_size_tokens:
            if not self._free_block_ids:
                raise OutOfKVBlocks("no free KV block to extend the sequence")
            table.append(self._free_block_ids.pop())
        self._num_tokens[req_id] = pos + 1
        return self.slot(req_id, pos)

    def slot(self, req_id: str, pos: int) -> int:
        block = self._tables[req_id][pos // self.block_size_tokens]
        return block * self.block_size_tokens + pos % self.block_size_tokens

    def table(self, req_id: str) -> list[int]:
        return self._tables[req_id]

    def num_tokens(self, req_id: str) -> int:
        return self._num_tokens[req_id]

    def holds(self, req_id: str) -> bool:
        return req_id in self._tables

    def free(self, req_id: str) -> bool:
        """Return a request's blocks; False when it held none (idempotent for abort paths)."""
        table = self._tables.pop(req_id, None)
        self._num_tokens.pop(req_id, None)
        if table is None:
            return False
        self._free_block_ids.extend(reversed(table))
        return True


class PagedKVCache:
    """KV tensors [layers, blocks * block_size, KV, D] addressed through a BlockAllocator."""

    def __init__(self, config: ModelConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        shape = (config.num_layers, allocator.num_blocks * allocator.block_size_tokens,
                 config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape)
        self.v = torch.zeros(shape)

    def _slots(self, req_id: str, start: int, num_tokens: int) -> torch.Tensor:
        bs = self.allocator.block_size_tokens
        table = torch.tensor(self.allocator.table(req_id), dtype=torch.long)
        pos = torch.arange(start, start + num_tokens)
        return table[pos // bs] * bs + pos % bs

    def import_layer(self, req_id: str, layer: int, kv: torch.Tensor, start: int = 0) -> None:
        """Scatter a contiguous [2, T, KV, D] layer buffer into the request's blocks."""
        slots = self._slots(req_id, start, kv.shape[1])
        self.k[layer, slots] = kv[0]
        self.v[layer, slots] = kv[1]

    def export_layer(self, req_id: str, layer: int) -> torch.Tensor:
        """Gather one layer of a request into a contiguous [2, T, KV, D] buffer."""
        slots = self._slots(req_id, 0, self.allocator.num_tokens(req_id))
        return torch.stack([self.k[layer, slots], self.v[layer, slots]])

    def write_token(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, slots] = k
        self.v[layer, slots] = v

    def gather(self, layer: int, slot_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at padded slot indices [B, C] -> [B, C, KV, D] each."""
        return self.k[layer][slot_matrix], self.v[layer][slot_matrix]

    def context_slots(self, req_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded slot matrix [B, C] and validity mask for the current length of each request."""
        lengths = [self.allocator.num_tokens(r) for r in req_ids]
        max_len = max(lengths)
        slot_matrix = torch.zeros(len(req_ids), max_len, dtype=torch.long)
        mask = torch.zeros(len(req_ids), max_len, dtype=torch.bool)
        for i, (req_id, n) in enumerate(zip(req_ids, lengths)):
            slot_matrix[i, :n] = self._slots(req_id, 0, n)
            mask[i, :n] = True
        return slot_matrix, mask
