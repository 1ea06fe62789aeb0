"""Tag layout and the flow interface shared by the UCX agent, its engine and its flows."""
from __future__ import annotations

from pdserve.kvtransfer import base

_SLOT_BITS = 16
ACK_SLOT = (1 << _SLOT_BITS) - 2
ABORT_SLOT = (1 << _SLOT_BITS) - 1
INBOX_TAG = 0                       # transfer id 0 is reserved for the inbox
MAX_LAYERS = (ACK_SLOT - 3) // 2   # layer slots, then the trailer's frame and payload, below ACK_SLOT
MAX_TRANSFER_ID = (1 << (64 - _SLOT_BITS)) - 1
assert MAX_TRANSFER_ID == base.MAX_TRANSFER_ID, "tags must carry every transfer id"
# How long a failed transfer's late messages are looked for and discarded (drained).
DRAIN_S = 2.0


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


class Flow:
    """One thing the UCX engine steps: a transfer's send or receive, the inbox, a drain."""

    finished = False

    def step(self, now_s: float) -> bool:
        """Look at what UCX completed or delivered and post what comes next; True when anything
        changed (the engine then steps again before it sleeps)."""
        raise NotImplementedError

    def wake_at_s(self) -> float:
        """Seconds until this flow must be stepped even if nothing happens (a deadline)."""
        return float("inf")

    def close(self) -> None:
        """The agent is closing."""
