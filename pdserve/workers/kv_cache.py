"""Paged KV cache for decode plus contiguous per-layer export/import for transfer.

Ownership: `BlockAllocator` (policy/kv_blocks.py) hands out fixed-size blocks to a request id and
keeps named prefix blocks for reuse; whoever allocated must call `free()` exactly once when the
request finishes, fails or is aborted. `PagedKVCache` holds the tensors; it never allocates blocks
itself. A transferred layer arrives as one contiguous
[2, T, KV, D] buffer and is scattered into the request's blocks by `import_layer`.
"""
from __future__ import annotations

import torch

from pdserve.policy.kv_blocks import BlockAllocator, OutOfKVBlocks

__all__ = ["BlockAllocator", "OutOfKVBlocks", "PagedKVCache"]   # the allocator names are re-exported
from pdserve.workers.model.config import ModelConfig


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
        """Scatter a contiguous [2, T, KV, D] layer buffer into the request's blocks from token
        `start` on (tokens before it are linked cached blocks, which are never written)."""
        slots = self._slots(req_id, start, kv.shape[1])
        self.k[layer, slots] = kv[0]
        self.v[layer, slots] = kv[1]

    def export_layer(self, req_id: str, layer: int) -> torch.Tensor:
        """Gather one layer of a request into a contiguous [2, T, KV, D] buffer."""
        slots = self._slots(req_id, 0, self.allocator.num_tokens(req_id))
        return torch.stack([self.k[layer, slots], self.v[layer, slots]])

    def _block_slots(self, blocks: list[int]) -> torch.Tensor:
        bs = self.allocator.block_size_tokens
        return (torch.tensor(blocks, dtype=torch.long)[:, None] * bs + torch.arange(bs)).reshape(-1)

    def gather_blocks(self, blocks: list[int], num_tokens: int) -> list[torch.Tensor]:
        """Per layer, a new [2, num_tokens, KV, D] buffer whose first positions hold the KV of
        `blocks` (in order), copied block by block (one copy; a gather by token slot was two)."""
        bs, n = self.allocator.block_size_tokens, len(blocks)
        index = torch.tensor(blocks, dtype=torch.long)
        layers = []
        for layer in range(self.config.num_layers):
            buf = self.k.new_empty((2, num_tokens, *self.k.shape[2:]))
            for side, pool in ((0, self.k), (1, self.v)):
                out = buf[side, :n * bs].view(n, bs, *pool.shape[2:])
                torch.index_select(self._blocks(pool, layer), 0, index, out=out)
            layers.append(buf)
        return layers

    def _blocks(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer of the pool as [blocks, block size, KV, D] (a view)."""
        return pool[layer].view(self.allocator.num_blocks, self.allocator.block_size_tokens, *pool.shape[2:])

    def fill_blocks(self, placed: list[tuple[int, int]], layers: list[torch.Tensor]) -> None:
        """Copy prompt blocks into the pool: (block index in the prompt, pool block) pairs, from
        per-layer [2, T, KV, D] buffers of the whole prompt."""
        if not placed:
            return
        bs = self.allocator.block_size_tokens
        slots = self._block_slots([block for _, block in placed])
        src = (torch.tensor([i for i, _ in placed], dtype=torch.long)[:, None] * bs + torch.arange(bs)).reshape(-1)
        for layer, kv in enumerate(layers):
            self.k[layer, slots] = kv[0, src]
            self.v[layer, slots] = kv[1, src]

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
