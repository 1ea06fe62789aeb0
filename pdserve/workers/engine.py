"""Synchronous model engine of one worker; every method runs on the worker's compute thread.

Request lifecycle through the engine:
- aggregated: `start_local()` allocates KV blocks, prefills the prompt operator by operator while
  writing each layer into the paged cache, samples the first token and joins the running batch;
- prefill role: `prefill_and_send()` runs the operators and hands each finished layer's KV to a
  KV sender at once (the transfer overlaps the remaining layers), then sends the first token in
  the trailer; it keeps no KV afterwards;
- decode role: `reserve()` allocates blocks and a contiguous staging buffer the receiver fills;
  `start_remote()` scatters the staged layers into the paged cache and joins the running batch;
- `step()` decodes one token for every running sequence (continuous batching: sequences join and
  leave between steps); `release()` frees a finished or aborted request's blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.kvtransfer import BaseKVSender, as_bytes_view
from pdserve.workers.kv_cache import BlockAllocator, OutOfKVBlocks, PagedKVCache
from pdserve.workers.model.execution import OperatorKind, PrefillExecution, decode_step
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.sampling import SamplingConfig, sample_token
from pdserve.workers.output import Delta, Finish, OutputProcessor


@dataclass
class Sequence:
    req_id: str
    params: SamplingConfig
    output: OutputProcessor
    last_token_id: int
    num_prompt_tokens: int


@dataclass
class Reservation:
    req_id: str
    num_prompt_tokens: int
    staging: torch.Tensor   # [L, 2, T, KV, D]; the receiver writes here


@dataclass
class PrefillResult:
    first_token_id: int
    compute_s: float
    kv_bytes: int


class Engine:
    def __init__(self, loaded: LoadedModel, num_kv_blocks: int, block_size_tokens: int, max_batch_size: int):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.model.config
        self.allocator = BlockAllocator(num_kv_blocks, block_size_tokens)
        self.cache = PagedKVCache(self.config, self.allocator)
        self.max_batch_size = max_batch_size
        self.running: dict[str, Sequence] = {}

    # ---- admission checks (pair with the actions below) ----
    def check_prompt(self, num_prompt_tokens: int, params: SamplingConfig) -> None:
        params.validate()
        limit = self.config.max_position_tokens
        if num_prompt_tokens == 0:
            raise ValueError("prompt is empty")
        if num_prompt_tokens >= limit:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; the model's context is {limit}")

    def can_admit(self, num_prompt_tokens: int) -> bool:
        # One extra token so the first decode step never finds the pool exhausted.
        return len(self.running) < self.max_batch_size and self.allocator.can_allocate(num_prompt_tokens + 1)

    def layer_nbytes(self, num_tokens: int) -> tuple[int, ...]:
        return (num_tokens * self.config.kv_bytes_per_token_per_layer,) * self.config.num_layers

    # ---- aggregated ----
    def _admit(self, num_prompt_tokens: int) -> None:
        # Checked in the same call that allocates: both run on the compute thread, so no other
        # request can take the blocks in between.
        if not self.can_admit(num_prompt_tokens):
            raise OutOfKVBlocks(f"no room for {num_prompt_tokens} more tokens: {self.allocator.num_free_blocks} "
                                f"free KV blocks, {len(self.running)}/{self.max_batch_size} sequences running")

    def start_local(self, req_id: str, prompt_ids: list[int], params: SamplingConfig) -> Delta:
        self._admit(len(prompt_ids))
        self.allocator.allocate(req_id, len(prompt_ids))
        try:
            execution = PrefillExecution(self.model, prompt_ids)
            while not execution.done:
                op = execution.step()
                if op.kind is OperatorKind.ATTENTION:
                    self.cache.import_layer(req_id, op.layer, op.layer_kv)
            first = sample_token(execution.logits, params, 0)
            return self._join(req_id, len(prompt_ids), params, first)
        except Exception:
            self.release(req_id)
            raise

    # ---- prefill role ----
    def prefill_and_send(self, prompt_ids: list[int], params: SamplingConfig,
                         sender: BaseKVSender) -> PrefillResult:
        start = time.perf_counter()
        execution = PrefillExecution(self.model, prompt_ids)
        kv_bytes = 0
        while not execution.done:
            op = execution.step()
            if op.kind is OperatorKind.ATTENTION:
                view = as_bytes_view(op.layer_kv.numpy())
                sender.send_layer(op.layer, view)
                kv_bytes += len(view)
        return PrefillResult(sample_token(execution.logits, params, 0), time.perf_counter() - start, kv_bytes)

    # ---- decode role ----
    def reserve(self, req_id: str, num_prompt_tokens: int) -> Reservation:
        self._admit(num_prompt_tokens)
        self.allocator.allocate(req_id, num_prompt_tokens)
        cfg = self.config
        staging = torch.empty(cfg.num_layers, 2, num_prompt_tokens, cfg.num_kv_heads, cfg.head_dim)
        return Reservation(req_id, num_prompt_tokens, staging)

    def start_remote(self, res: Reservation, params: SamplingConfig, first_token_id: int) -> Delta:
        try:
            for layer in range(self.config.num_layers):
                self.cache.import_layer(res.req_id, layer, res.staging[layer])
            return self._join(res.req_id, res.num_prompt_tokens, params, first_token_id)
        except Exception:
            self.release(res.req_id)
            raise

    # ---- shared ----
    def _join(self, req_id: str, num_prompt: int, params: SamplingConfig, first: int) -> Delta:
        output = OutputProcessor(self.loaded.tokenizer, params, num_prompt, self.config.max_position_tokens)
        delta = output.add(first)
        if delta.finish is None:
            self.running[req_id] = Sequence(req_id, params, output, first, num_prompt)
        else:
            self.release(req_id)
        return delta

    def step(self) -> dict[str, Delta]:
        """One decode step for up to max_batch_size running sequences."""
        batch = [s for s in self.running.values() if self.allocator.can_append(s.req_id)]
        batch = batch[: self.max_batch_size]
        deltas: dict[str, Delta] = {}
        for seq in list(self.running.values()):
            if seq not in batch and not batch:
                # Pool exhausted and nothing can advance: stop rather than deadlock.
                deltas[seq.req_id] = Delta([], "", Finish.LENGTH)
                self.release(seq.req_id)
        if not batch:
            return deltas
        for seq in batch:
            self.allocator.append_token(seq.req_id)
        logits = decode_step(self.model, self.cache, [s.req_id for s in batch], [s.last_token_id for s in batch])
        for seq, row in zip(batch, logits):
            token = sample_token(row, seq.params, len(seq.output.token_ids))
            delta = seq.output.add(token)
            seq.last_token_id = token
            deltas[seq.req_id] = delta
            if delta.finish is not None:
                self.release(seq.req_id)
        return deltas

    def release(self, req_id: str) -> None:
        """Free a request's KV and drop it from the batch; safe to call more than once."""
        self.running.pop(req_id, None)
        self.allocator.free(req_id)
