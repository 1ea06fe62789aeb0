"""Decode batch scheduling: which sequences advance this step, which give up their KV.

Call contract (after vLLM's scheduler interface): `schedule()` is called once per decode step,
before the model runs, with every running sequence in the order it joined, every preempted
sequence in the order it was preempted, and the KV pool's free block count. It has no side
effects; it returns a `DecodeStepPlan` that the engine carries out in this order:
1. `stop_ids`: can never fit in the pool again; they finish with `length` and are released;
2. `preempt_ids`: free all their blocks now and wait; nothing they generated is lost;
3. `resume_ids`: allocate blocks for their tokens and recompute that KV (prompt + generated);
   they advance from the next step on;
4. `run_ids`: grow by one token each (the plan counted the blocks that takes) and decode.
Ownership: the engine owns every block; the plan only says who holds blocks after the step.

Policy when the pool cannot grow every running sequence: the oldest sequences keep going and the
newest are preempted (recomputation beats swapping on a host without spare memory, as in vLLM).
Preempted sequences resume first-in first-out, only once nothing was preempted in the same step
(no thrash), and before any new request is admitted (`admits_new` says when that is allowed).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeqView:
    req_id: str
    num_kv_tokens: int        # tokens whose KV the sequence holds (or must recompute) now


@dataclass(frozen=True)
class DecodeStepPlan:
    run_ids: tuple[str, ...] = ()
    preempt_ids: tuple[str, ...] = ()
    resume_ids: tuple[str, ...] = ()
    stop_ids: tuple[str, ...] = ()


class DecodeScheduler:
    def __init__(self, num_total_blocks: int, block_size_tokens: int, max_batch_size: int):
        self.num_total_blocks = num_total_blocks
        self.block_size_tokens = block_size_tokens
        self.max_batch_size = max_batch_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size_tokens)

    def _growth_blocks(self, seq: SeqView) -> int:
        """Blocks one more token takes: one exactly when the last block is full."""
        return self.blocks_for(seq.num_kv_tokens + 1) - self.blocks_for(seq.num_kv_tokens)

    def admits_new(self, num_waiting: int) -> bool:
        """New requests wait while preempted ones do, so a preempted sequence is never starved."""
        return num_waiting == 0

    def schedule(self, running: list[SeqView], waiting: list[SeqView], num_free_blocks: int) -> DecodeStepPlan:
        stop = [s.req_id for s in (*running, *waiting) if self.blocks_for(s.num_kv_tokens + 1) > self.num_total_blocks]
        stopped = set(stop)
        free = num_free_blocks      # a stopped sequence's blocks come back only when it is released
        queue = [s for s in running if s.req_id not in stopped]
        run, preempt = [], []
        while queue:
            seq = queue.pop(0)                      # oldest first
            need = self._growth_blocks(seq)
            while need > free and queue:
                victim = queue.pop()                # newest gives its blocks back
                preempt.append(victim.req_id)
                free += self.blocks_for(victim.num_kv_tokens)
            if need > free:
                preempt.append(seq.req_id)          # alone and still no room: it waits too
                free += self.blocks_for(seq.num_kv_tokens)
                continue
            free -= need
            run.append(seq.req_id)
        resume = [] if preempt else self._resumable(waiting, stopped, free, len(run))
        return DecodeStepPlan(tuple(run), tuple(preempt), tuple(resume), tuple(stop))

    def _resumable(self, waiting: list[SeqView], stopped: set[str], free: int, num_running: int) -> list[str]:
        resume = []
        for seq in waiting:
            if seq.req_id in stopped:
                continue
            need = self.blocks_for(seq.num_kv_tokens + 1)   # its KV plus room for the next token
            if need > free or num_running + len(resume) >= self.max_batch_size:
                break                                       # first in, first out: no overtaking
            free -= self.blocks_for(seq.num_kv_tokens)
            resume.append(seq.req_id)
        return resume
