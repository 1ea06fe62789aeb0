"""Tag layout and waits shared by the UCX agent and its send/receive flows."""
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


# ucxx is imported on first use, not with this module: importing it edits the UCX environment,
# which the agent inspects first (ucx._prepare_ucx_environment).
def ucx_tag(value: int):
    from ucxx.types import Tag
    return Tag(value)


def ucx_buffer(obj):
    """A ucxx view of a buffer-protocol object (it keeps `obj` alive)."""
    from ucxx._lib.arr import Array
    return Array(obj)


class Aborted(Exception):
    pass


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
