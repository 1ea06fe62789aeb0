"""Resumable prefill (one operator per step) and batched decode over the paged cache.

Lifecycle of a prefill: `PrefillExecution(model, token_ids)` embeds the prompt; each `step()` runs
the next operator (layer 0 ATTENTION, layer 0 MLP, layer 1 ATTENTION, ...) and returns which
operator ran and, after an ATTENTION, the finished layer's contiguous KV buffer [2, T, KV, D]. The
caller may stop calling `step()` at any time and resume later: all state (hidden states, finished
layers' KV) lives in the object, so nothing is recomputed. After the last operator `logits` holds
the last position's logits, from which the first output token is sampled.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from pdserve.workers.kv_cache import PagedKVCache
from pdserve.workers.model.llama import LlamaModel


class OperatorKind(enum.Enum):
    ATTENTION = "attention"
    MLP = "mlp"


@dataclass(frozen=True)
class OperatorResult:
    layer: int
    kind: OperatorKind
    # Set after ATTENTION: this layer's KV, complete and immutable from now on.
    layer_kv: torch.Tensor | None


class PrefillExecution:
    def __init__(self, model: LlamaModel, token_ids: list[int]):
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        if len(token_ids) > model.config.max_position_tokens:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, model limit is {model.config.max_position_tokens}"
            )
        self.model = model
        self.num_tokens = len(token_ids)
        self._positions = torch.arange(self.num_tokens)
        self._hidden = model.embed(torch.tensor(token_ids, dtype=torch.long))
        self._next_op = 0
        self.num_ops = 2 * model.config.num_layers
        self.layer_kv: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self._next_op >= self.num_ops

    @property
    def next_op_index(self) -> int:
        return self._next_op

    def step(self) -> OperatorResult:
        if self.done:
            raise RuntimeError("prefill already finished")
        layer, is_mlp = divmod(self._next_op, 2)
        with torch.inference_mode():
            if is_mlp:
                self._hidden = self.model.mlp(layer, self._hidden)
                result = OperatorResult(layer, OperatorKind.MLP, None)
            else:
                self._hidden, k, v = self.model.prefill_attention(layer, self._hidden, self._positions)
                kv = torch.stack([k, v]).contiguous()
                self.layer_kv.append(kv)
                result = OperatorResult(layer, OperatorKind.ATTENTION, kv)
            self._next_op += 1
            if self.done:
                self.logits = self.model.logits(self._hidden[-1])
        return result

    def run_to_end(self) -> torch.Tensor:
        while not self.done:
            self.step()
        assert self.logits is not None
        return self.logits


def decode_step(
    model: LlamaModel, cache: PagedKVCache, req_ids: list[str], token_ids: list[int]
) -> torch.Tensor:
    """Append one token to each sequence and return next-token logits [B, vocab].

    The caller must have reserved one more slot per request in the allocator beforehand
    (`BlockAllocator.append_token`), so the new token's slot is the last one of the sequence.
    """
    alloc = cache.allocator
    positions = torch.tensor([alloc.num_tokens(r) - 1 for r in req_ids])
    new_slots = torch.tensor([alloc.slot(r, int(p)) for r, p in zip(req_ids, positions)])
    slot_matrix, mask = cache.context_slots(req_ids)
    with torch.inference_mode():
        hidden = model.embed(torch.tensor(token_ids, dtype=torch.long))
        for layer in range(model.config.num_layers):
            q, k, v = model.qkv(layer, hidden, positions)
            cache.write_token(layer, new_slots, k, v)
            k_ctx, v_ctx = cache.gather(layer, slot_matrix)
            hidden = model.decode_attention(layer, hidden, q, k_ctx, v_ctx, mask)
            hidden = model.mlp(layer, hidden)
        return model.logits(hidden)
