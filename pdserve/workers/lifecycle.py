"""One owner for every request's KV on a worker, from admission to its single release.

Stages (after SGLang's decode prealloc/transfer queues, in one table):
- RESERVED   (decode role) `ReserveKV`: blocks, a staging buffer and an armed KV receiver;
- RECEIVING  its `Generate(remote_prefill)` claimed it; the KV is arriving;
- PREFILLING (local prompt) blocks taken, the prompt is in the prefill scheduler;
- DECODING   `start()` imported the KV into the paged pool (the staging buffer and receiver are
  dropped right there) and the sequence is in the engine's batch;
- RELEASED   `release()` ran: receiver aborted if still active, blocks freed.
`release()` is the only way out and runs at most once per request, whatever the exit: finish,
client cancel, `Abort`, deadline, transfer failure, or lease expiry (`expired()`, checked by the
worker's reaper task on its own timer, so expiry does not wait for the decode loop to go idle).
Engine calls go through `run_compute` (the worker's single compute thread), except admission and
the release of a request no step or import can be using, which are bookkeeping only (see
workers/engine.py): neither waits for a decode step.
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from pdserve.clock import Clock
from pdserve.kvtransfer import BaseKVReceiver, TransferState
from pdserve.workers.engine import Engine
from pdserve.workers.model.sampling import SamplingConfig
from pdserve.workers.output import Delta

log = logging.getLogger("pdserve.worker")

RunCompute = Callable[..., Awaitable]
# Abort calls for requests not (yet) here that are remembered; past the bound, the oldest go.
_MAX_ABORTED_REMEMBERED = 65536


class RequestGone(Exception):
    """An Abort for this request id came before the request itself (it overtook its ReserveKV)."""


class Stage(enum.Enum):
    RESERVED = "reserved"
    RECEIVING = "receiving"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    RELEASED = "released"


@dataclass
class WorkerRequest:
    req_id: str
    num_prompt_tokens: int
    created_s: float
    stage: Stage
    staging: torch.Tensor | None = None          # [L, 2, T, KV, D], remote KV lands here
    admitted: bool = False                       # its blocks are taken (counted in the free count)
    receiver: BaseKVReceiver | None = None
    cached_tokens: int = 0                       # leading prompt tokens linked from the prefix cache
    prompt_ids: list[int] | None = None          # what the cached blocks were matched against


class RequestLifecycle:
    def __init__(self, engine: Engine, run_compute: RunCompute, clock: Clock, lease_s: float,
                 on_release: Callable[[], None] | None = None):
        self.engine = engine
        self._on_release = on_release        # e.g. wake a decode loop whose preempted work waits for blocks
        self._run = run_compute
        self._clock = clock
        self.lease_s = lease_s
        self._requests: dict[str, WorkerRequest] = {}
        # Abort of a request id not here yet -> when: the caller cancelled a ReserveKV that has
        # not arrived, and its Abort overtook it; that request must not be admitted after it.
        self._aborted: OrderedDict[str, float] = OrderedDict()
        self.num_released = 0

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, req_id: str) -> WorkerRequest | None:
        return self._requests.get(req_id)

    def admitted_ids(self) -> list[str]:
        """Requests whose blocks are taken: what the worker's free-block count already reflects."""
        return [r.req_id for r in self._requests.values() if r.admitted]

    def num_in(self, stage: Stage) -> int:
        return sum(r.stage is stage for r in self._requests.values())

    # ---- admission ----
    async def reserve(self, req_id: str, num_prompt_tokens: int,
                      arm_receiver: Callable[[WorkerRequest], BaseKVReceiver],
                      prompt_ids: list[int] | None = None) -> WorkerRequest:
        """Decode role: blocks (the cached prefix linked when `prompt_ids` are given) + staging
        for the tokens after it + armed receiver. Raises OutOfKVBlocks."""
        req = self._admit(req_id, num_prompt_tokens, Stage.RESERVED, prompt_ids)
        try:
            req.staging = self.engine.new_staging(num_prompt_tokens - req.cached_tokens)
            req.receiver = arm_receiver(req)
        except BaseException:
            await self.release(req_id, "could not arm the KV receiver")
            raise
        return req

    def admit_local(self, req_id: str, prompt_ids: list[int]) -> WorkerRequest:
        """Local prompt: blocks for it (its cached prefix linked) while the prefill scheduler
        computes the rest. Raises OutOfKVBlocks."""
        return self._admit(req_id, len(prompt_ids), Stage.PREFILLING, prompt_ids)

    def _admit(self, req_id: str, num_prompt_tokens: int, stage: Stage,
                     prompt_ids: list[int] | None = None) -> WorkerRequest:
        if req_id in self._requests:
            raise ValueError(f"request {req_id!r} is already on this worker")
        if self._aborted.pop(req_id, None) is not None:
            raise RequestGone(f"request {req_id!r} was aborted before it arrived")
        # Called here, not queued on the compute thread: admission is bookkeeping under the
        # engine's lock, so it need not wait for a decode step to end (it used to, on the
        # time to first token of every request). No await between the check and the entry, so
        # a duplicate or an abort cannot come in between.
        cached = self.engine.admit(req_id, num_prompt_tokens, prompt_ids)
        req = self._requests[req_id] = WorkerRequest(req_id, num_prompt_tokens, self._clock.now_s(), stage,
                                                     admitted=True, cached_tokens=cached, prompt_ids=prompt_ids)
        return req

    def claim(self, req_id: str) -> WorkerRequest | None:
        """The decode stream takes its reservation: RESERVED -> RECEIVING; None if there is none."""
        req = self._requests.get(req_id)
        if req is None or req.stage is not Stage.RESERVED:
            return None
        req.stage = Stage.RECEIVING
        return req

    async def start(self, req: WorkerRequest, kv_token_ids: list[int], layers, params: SamplingConfig,
                    first_token_id: int, resume_output_ids: list[int], layers_start_tokens: int = 0,
                    first=None) -> Delta:
        """KV imported into the pool and the sequence in the batch; the staging copy goes at once.
        `first`: the engine's `first_output()` for this prompt, if taken already."""
        delta = await self._run(self.engine.start, req.req_id, kv_token_ids, layers, params, first_token_id,
                                resume_output_ids, layers_start_tokens, first)
        req.stage, req.staging, req.receiver = Stage.DECODING, None, None
        return delta

    # ---- the one way out ----
    async def release(self, req_id: str, reason: str) -> bool:
        """Free everything the request holds; False if it was already released (or never here)."""
        req = self._requests.pop(req_id, None)
        if req is None:
            return False
        # RESERVED: no import ever started; DECODING: its import is done. Either is freed here and
        # now unless a step may be using its blocks (it is in the batch); RECEIVING and PREFILLING
        # may have an import queued or running, which the compute thread's FIFO puts first.
        idle = req.stage in (Stage.RESERVED, Stage.DECODING)
        req.stage = Stage.RELEASED
        if req.receiver is not None:
            req.receiver.abort(reason)     # idempotent; forgets the transfer on the agent
        req.staging, req.receiver = None, None
        if not (idle and self.engine.release_if_idle(req_id)):
            # Shielded: a cancelled executor job that has not started yet would never run, and the
            # request is already out of the table, so its blocks would be lost.
            await asyncio.shield(self._run(self.engine.release, req_id))
        self.num_released += 1
        if self._on_release is not None:
            self._on_release()
        log.info("request %s: released its KV (%s)", req_id, reason)
        return True

    def remember_abort(self, req_id: str) -> None:
        """An Abort found no request `req_id`: refuse it if it still comes (within the lease; a
        reservation arriving later than that would expire like any unclaimed one)."""
        now_s = self._clock.now_s()
        self._aborted[req_id] = now_s
        self._aborted.move_to_end(req_id)
        while self._aborted and (len(self._aborted) > _MAX_ABORTED_REMEMBERED
                                 or now_s - next(iter(self._aborted.values())) > self.lease_s):
            self._aborted.popitem(last=False)

    async def drop_unclaimed(self, req_id: str, reason: str) -> bool:
        """Release a reservation only if no decode stream has claimed it yet."""
        req = self._requests.get(req_id)
        return req is not None and req.stage is Stage.RESERVED and await self.release(req_id, reason)

    async def drop_all_unclaimed(self, reason: str) -> list[str]:
        unclaimed = [r.req_id for r in self._requests.values() if r.stage is Stage.RESERVED]
        return [req_id for req_id in unclaimed if await self.drop_unclaimed(req_id, reason)]

    def abort_transfer(self, req_id: str, reason: str) -> None:
        """Fail a transfer in flight now (its waiter sees FAILED and ends, then releases)."""
        req = self._requests.get(req_id)
        if req is not None and req.receiver is not None:
            req.receiver.abort(reason)

    def expired(self, now_s: float) -> list[str]:
        """Reservations nobody claimed within the lease, or whose transfer already failed."""
        return [r.req_id for r in self._requests.values() if r.stage is Stage.RESERVED and (
            now_s - r.created_s > self.lease_s
            # No receiver yet: its admission is still running.
            or (r.receiver is not None and r.receiver.poll() is TransferState.FAILED))]

    async def release_expired(self) -> list[str]:
        released = []
        for req_id in self.expired(self._clock.now_s()):
            if await self.release(req_id, "reservation expired"):
                released.append(req_id)
        return released
