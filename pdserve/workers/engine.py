"""Synchronous decode engine of one worker, run by the worker's compute thread (see Threads below).

It owns the paged KV pool and the sequences that hold it. Prefill itself is not computed here:
every prompt goes through the prefill scheduler (prefill_runner.py), locally or on a prefill
worker, and arrives as one contiguous [2, T, kv_heads, head_dim] buffer per layer.
- `admit()` allocates a request's prompt blocks (checked and taken in one call);
- `start()` scatters the prompt's layers into those blocks, takes the first token and joins the
  running batch;
- `step()` is schedule -> run -> postprocess: the pure `DecodeScheduler` picks the batch and,
  when the pool cannot grow every sequence, which newest sequences give their blocks back; a
  preempted sequence later recomputes its KV (prompt + generated tokens) and carries on with the
  same tokens it would have produced;
- `release()` frees a request's blocks; the worker's request lifecycle calls it exactly once per
  request (workers/lifecycle.py). The engine never releases a request on its own (a finished
  sequence keeps its blocks until then); preemption only lends blocks back until the resume.

Threads: every method runs on the worker's compute thread except `admit()`,
`release_if_idle()` and `drain_prefix_events()`, which may run on any thread at any time, so that
a KV reservation, a finished request's release or a heartbeat does not wait for a decode step. They only touch block bookkeeping, never KV data, so
`books` (a lock) guards every change of the bookkeeping, not the model's compute: a step plans
and takes its slots under it, then runs the model without it. KV data is read and written on the
compute thread only, so a block's contents are always written before anything reads them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from pdserve.policy.decode_scheduler import DecodeScheduler, DecodeStepPlan, SeqView
from pdserve.policy.prefix_cache import block_hashes, reusable_blocks
from pdserve.workers.kv_cache import BlockAllocator, OutOfKVBlocks, PagedKVCache
from pdserve.workers.model.execution import OperatorKind, PrefillExecution, decode_step
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.sampling import SamplingConfig, sample_token, token_logprob
from pdserve.workers.model.unit_execution import CachedPrefix
from pdserve.workers.output import Delta, Finish, OutputProcessor


@dataclass
class Sequence:
    req_id: str
    prompt_ids: list[int]
    params: SamplingConfig
    output: OutputProcessor
    last_token_id: int           # sampled, its KV not written yet

    @property
    def num_kv_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output.token_ids) - 1

    def kv_token_ids(self) -> list[int]:
        """The tokens whose KV the sequence holds: what a recompute must prefill."""
        return self.prompt_ids + self.output.token_ids[:-1]


@dataclass
class EngineStats:
    num_preemptions: int = 0
    num_resumes: int = 0


class Engine:
    def __init__(self, loaded: LoadedModel, num_kv_blocks: int, block_size_tokens: int, max_batch_size: int,
                 prefix_caching: bool = False):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.model.config
        self.allocator = BlockAllocator(num_kv_blocks, block_size_tokens, prefix_caching)
        self.cache = PagedKVCache(self.config, self.allocator)
        self.max_batch_size = max_batch_size
        self.scheduler = DecodeScheduler(num_kv_blocks, block_size_tokens, max_batch_size)
        self.running: OrderedDict[str, Sequence] = OrderedDict()   # in join order
        self.preempted: OrderedDict[str, Sequence] = OrderedDict()  # in preemption order
        self.admitted: set[str] = set()     # admit() .. release(): what counts against max_batch_size
        self.stats = EngineStats()
        self.books = threading.Lock()       # block bookkeeping, `admitted` and the batch's membership

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.preempted)

    # ---- admission (the check and the action in one call on the compute thread) ----
    def check_prompt(self, num_prompt_tokens: int, params: SamplingConfig) -> None:
        params.validate()
        limit = self.config.max_position_tokens
        if num_prompt_tokens == 0:
            raise ValueError("prompt is empty")
        if num_prompt_tokens >= limit:
            raise ValueError(f"prompt has {num_prompt_tokens} tokens; the model's context is {limit}")

    def layer_nbytes(self, num_tokens: int) -> tuple[int, ...]:
        return (num_tokens * self.config.kv_bytes_per_token_per_layer,) * self.config.num_layers

    def prompt_hashes(self, token_ids: Seq[int], reusable_only: bool = True) -> list[int]:
        """Names of the prompt's full blocks; `reusable_only`: those a prefill may skip (never
        the block of the last token, whose logits are needed)."""
        if not self.allocator.prefix_caching:
            return []
        bs = self.allocator.block_size_tokens
        return block_hashes(token_ids, bs, reusable_blocks(len(token_ids), bs) if reusable_only else None)

    def admit(self, req_id: str, num_prompt_tokens: int, prompt_ids: Seq[int] | None = None) -> int:
        """Blocks for the prompt, linking its cached prefix when `prompt_ids` are given; returns
        how many leading tokens are cached (their KV must not be imported again). Any thread."""
        hashes = self.prompt_hashes(prompt_ids) if prompt_ids is not None else []
        with self.books:
            # One extra token so the first decode step never finds the pool exhausted.
            # Every admitted request counts, also those still waiting for their KV (a remote prefill):
            # all of them join the batch, so admitting more than it holds would overfill it.
            num_active = len(self.admitted)
            if num_active >= self.max_batch_size:
                raise OutOfKVBlocks(f"its batch is full ({num_active}/{self.max_batch_size} sequences)")
            if not self.scheduler.admits_new(len(self.preempted)):
                raise OutOfKVBlocks(f"{len(self.preempted)} preempted sequences wait for KV before new ones")
            if not self.allocator.can_allocate(num_prompt_tokens + 1, hashes):
                raise OutOfKVBlocks(f"no room for {num_prompt_tokens} more tokens' KV "
                                    f"({self.allocator.num_free_blocks} free blocks)")
            cached = self.allocator.allocate(req_id, num_prompt_tokens, hashes)
            self.admitted.add(req_id)
        return cached

    def drain_prefix_events(self, snapshot: bool = False) -> tuple[list[int], list[int], bool]:
        """Prefix blocks named and evicted since the last call (BlockAllocator.drain_events). Any thread."""
        with self.books:
            return self.allocator.drain_events(snapshot)

    # ---- prefix cache reads and writes (prefill side) ----
    def cached_prefix(self, req_id: str, num_prompt_tokens: int) -> CachedPrefix | None:
        """The cached blocks an admitted request linked, in buffers for its prompt (None: none)."""
        num_blocks = self.allocator.num_cached_tokens(req_id) // self.allocator.block_size_tokens
        return self._prefix(self.allocator.table(req_id)[:num_blocks], num_prompt_tokens)

    def lookup_prefix(self, token_ids: Seq[int]) -> CachedPrefix | None:
        """A prefill worker's cache read: the longest cached prefix, in buffers for the prompt."""
        hashes = self.prompt_hashes(token_ids)
        with self.books:
            # An admission may evict these blocks once the lock is left, but only the compute
            # thread (this one) writes KV, so they still hold the prefix while they are copied.
            blocks = self.allocator.lookup(hashes, len(token_ids))
        return self._prefix(blocks, len(token_ids))

    def _prefix(self, blocks: list[int], num_prompt_tokens: int) -> CachedPrefix | None:
        if not blocks:
            return None
        return CachedPrefix(self.cache.gather_blocks(blocks, num_prompt_tokens),
                            len(blocks) * self.allocator.block_size_tokens)

    def store_prefix(self, token_ids: Seq[int], layers: Seq[torch.Tensor]) -> int:
        """Keep a prefilled prompt's full blocks for reuse (cache-only, evictable at once);
        returns how many blocks were added."""
        hashes = self.prompt_hashes(token_ids, reusable_only=False)
        with self.books:
            placed = self.allocator.store(hashes)
        # An admission may link these blocks before they are filled; nothing reads them before
        # this call returns, since only the compute thread reads KV.
        self.cache.fill_blocks(placed, list(layers))
        return len(placed)

    def new_staging(self, num_prompt_tokens: int) -> torch.Tensor:
        """Contiguous [L, 2, T, KV, D] buffer a KV receiver fills; dropped right after `start()`."""
        cfg = self.config
        return torch.empty(cfg.num_layers, 2, num_prompt_tokens, cfg.num_kv_heads, cfg.head_dim)

    def first_output(self, kv_token_ids: Seq[int], params: SamplingConfig, first_token_id: int,
                     resume_output_ids: Seq[int] = ()) -> tuple[OutputProcessor, Delta]:
        """The output state and the first delta of a prefilled prompt. It needs no KV, so a worker
        can stream the prefill's token before the import (`start(first=...)`) is done.

        `kv_token_ids` are the tokens the KV covers: the prompt, then (after a migration) the
        `resume_output_ids` a client already received; those are replayed into the output state
        without being emitted again, so stop sequences, max_tokens and seeded sampling carry on."""
        num_prompt_tokens = len(kv_token_ids) - len(resume_output_ids)
        output = OutputProcessor(self.loaded.tokenizer, params, num_prompt_tokens, self.config.max_position_tokens)
        for token in resume_output_ids:
            output.add(token)
        return output, output.add(first_token_id)

    def start(self, req_id: str, kv_token_ids: list[int], layers: Seq[torch.Tensor], params: SamplingConfig,
              first_token_id: int, resume_output_ids: Seq[int] = (), layers_start_tokens: int = 0,
              first: tuple[OutputProcessor, Delta] | None = None) -> Delta:
        """Import a prefilled prompt's KV into the blocks `admit()` took and join the batch.

        `layers` hold the tokens from `layers_start_tokens` on; the cached prefix admit() linked
        is skipped (shared blocks are read-only). The prompt's full blocks then become reusable.
        `first`: what `first_output()` gave for this prompt, if it was called already."""
        cached = self.allocator.num_cached_tokens(req_id)
        if layers_start_tokens > cached:
            raise ValueError(f"KV from token {layers_start_tokens} leaves a gap after {cached} cached tokens")
        for layer, kv in enumerate(layers):
            self.cache.import_layer(req_id, layer, kv[:, cached - layers_start_tokens:], start=cached)
        hashes = self.prompt_hashes(kv_token_ids, reusable_only=False)
        with self.books:
            self.allocator.register(req_id, hashes)
        output, delta = first or self.first_output(kv_token_ids, params, first_token_id, resume_output_ids)
        if delta.finish is None:
            prompt_ids = list(kv_token_ids[:len(kv_token_ids) - len(resume_output_ids)])
            with self.books:
                self.running[req_id] = Sequence(req_id, prompt_ids, params, output, first_token_id)
        return delta

    # ---- one decode step: schedule -> run -> postprocess ----
    def step(self) -> dict[str, Delta]:
        with self.books:
            # The plan counts free blocks, so it and the blocks it takes are one locked section.
            plan = self._schedule()
            for rid in plan.stop_ids:
                self._drop(rid)
            for rid in plan.preempt_ids:
                self._preempt(rid)
            for rid in plan.resume_ids:
                self._take_back(rid)
            batch = [self.running[rid] for rid in plan.run_ids]
            for seq in batch:
                self.allocator.append_token(seq.req_id)
        deltas = {rid: Delta([], "", Finish.LENGTH) for rid in plan.stop_ids}
        for rid in plan.resume_ids:
            self._recompute(rid)
        if batch:
            logits = decode_step(self.model, self.cache, [s.req_id for s in batch], [s.last_token_id for s in batch])
            deltas.update(self._postprocess(batch, logits))
        return deltas

    def _schedule(self) -> DecodeStepPlan:
        view = lambda seqs: [SeqView(s.req_id, s.num_kv_tokens) for s in seqs.values()]  # noqa: E731
        return self.scheduler.schedule(view(self.running), view(self.preempted), self.allocator.num_free_blocks)

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> dict[str, Delta]:
        deltas = {}
        for seq, row in zip(batch, logits):
            # Sampling is seeded by (seed, token index), so a resumed sequence draws the same tokens.
            token = sample_token(row, seq.params, len(seq.output.token_ids), self.config.eos_token_ids)
            delta = deltas[seq.req_id] = seq.output.add(token)
            if seq.params.logprobs is not None and delta.token_ids:
                delta.logprobs = [token_logprob(row, token, seq.params.logprobs)]
            seq.last_token_id = token
            if delta.finish is not None:
                # Its generated full blocks become reusable too: a chat's next turn repeats this
                # answer in its prompt. Every token of kv_token_ids has its KV written by now.
                hashes = self.prompt_hashes(seq.kv_token_ids(), reusable_only=False)
                with self.books:
                    self.allocator.register(seq.req_id, hashes)
                    self.running.pop(seq.req_id)            # blocks stay until release()
        return deltas

    def _preempt(self, req_id: str) -> None:
        seq = self.running.pop(req_id)
        self.allocator.free(req_id)
        self.preempted[req_id] = seq
        self.stats.num_preemptions += 1

    def _take_back(self, req_id: str) -> None:
        """A preempted sequence's blocks, again (under `books`); `_recompute` fills them."""
        seq = self.preempted.pop(req_id)
        self.allocator.allocate(req_id, len(seq.kv_token_ids()))
        self.running[req_id] = seq
        self.stats.num_resumes += 1

    def _recompute(self, req_id: str) -> None:
        """Recompute the KV a preempted sequence gave back. Not a client prefill: its first token
        was sampled long ago, so this only rebuilds cache state on the decode worker."""
        execution = PrefillExecution(self.model, self.running[req_id].kv_token_ids())
        while not execution.done:
            op = execution.step()
            if op.kind is OperatorKind.ATTENTION:
                self.cache.import_layer(req_id, op.layer, op.layer_kv)

    def _drop(self, req_id: str) -> None:
        self.running.pop(req_id, None)
        self.preempted.pop(req_id, None)

    def stop_all(self) -> list[str]:
        """Take every sequence out of the batch after a failed step (blocks stay until release)."""
        with self.books:
            ids = [*self.running, *self.preempted]
            self.running.clear()
            self.preempted.clear()
        return ids

    def release(self, req_id: str) -> None:
        """Free a request's KV and drop it from the batch; safe to call more than once."""
        with self.books:
            self._release(req_id)

    def release_if_idle(self, req_id: str) -> bool:
        """Free a request that is neither in the batch nor preempted, from any thread; False (and
        nothing done) when it is in either: then only the compute thread may free it, since a
        step may be using its blocks. The caller must know that no import is under way for it."""
        with self.books:
            if req_id in self.running or req_id in self.preempted:
                return False
            self._release(req_id)
            return True

    def _release(self, req_id: str) -> None:
        self._drop(req_id)
        self.allocator.free(req_id)
        self.admitted.discard(req_id)
