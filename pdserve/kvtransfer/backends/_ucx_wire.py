"""Tag layout and pacing shared by the UCX agent and its send/receive flows."""
from __future__ import annotations

import asyncio

from pdserve.kvtransfer import base

_SLOT_BITS = 16
ACK_SLOT = (1 << _SLOT_BITS) - 2
ABORT_SLOT = (1 << _SLOT_BITS) - 1
INBOX_TAG = 0                       # transfer id 0 is reserved for the inbox
MAX_LAYERS = (ACK_SLOT - 3) // 2   # layer slots, then the trailer's frame and payload, below ACK_SLOT
MAX_TRANSFER_ID = (1 << (64 - _SLOT_BITS)) - 1
assert MAX_TRANSFER_ID == base.MAX_TRANSFER_ID, "tags must carry every transfer id"
# Probe pacing: spin briefly (messages of one transfer follow each other closely), then back off
# exponentially up to a cap, so waiting through a long prefill costs few wake-ups: on a small host
# every wake-up steals time from the compute threads the transfer is meant to hide behind.
SPIN_PROBES = 50
BACKOFF_START_S = 0.00005
BACKOFF_S = 0.0005
IDLE_BACKOFF_S = 0.005
DRAIN_S = 2.0
DRAIN_POLL_S = 0.01
# How often a wait on a UCX request looks whether its transfer was aborted: a large send completes
# only when its peer receives it, which a peer that gave up never does; the wait must not last
# until the transfer's deadline (a prefill worker would count it as active that long).
ABORT_POLL_S = 0.05
REPLY_TIMEOUT_S = 1.0


def tag(transfer_id: int, slot: int) -> int:
    return (transfer_id << _SLOT_BITS) | slot


def frame_slot(layer_index: int) -> int:
    return 1 + 2 * layer_index


class Aborted(Exception):
    pass


class Pacer:
    def __init__(self, idle_s: float = BACKOFF_S):
        self._spins = 0
        self._idle_s = idle_s
        self._sleep_s = BACKOFF_START_S

    async def wait(self, idle_s: float | None = None) -> None:
        self._spins += 1
        if self._spins < SPIN_PROBES:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(self._sleep_s)
        self._sleep_s = min(2 * self._sleep_s, idle_s or self._idle_s)

    def reset(self) -> None:
        self._spins = 0
        self._sleep_s = BACKOFF_START_S


async def wait_active(task: asyncio.Future, timeout_s: float, status=None):
    """`task`'s result within `timeout_s` (asyncio.TimeoutError after), Aborted as soon as
    `status` (a TransferStatus) is no longer active. The task is never cancelled: UCX requests
    cannot be, and their buffers must outlive them (the caller keeps those)."""
    loop = asyncio.get_running_loop()
    end_s = loop.time() + timeout_s
    while not task.done():
        left_s = end_s - loop.time()
        if left_s <= 0:
            raise asyncio.TimeoutError()
        await asyncio.wait({task}, timeout=min(left_s, ABORT_POLL_S) if status is not None else left_s)
        if not task.done() and status is not None and not status.active:
            raise Aborted()
    return task.result()
