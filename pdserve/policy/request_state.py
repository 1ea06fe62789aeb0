"""The router's state machine for one request, with legal transitions only.

RECEIVED -> PLACED -> (WAITING_FOR_KV ->) DECODING -> FINISHED, or FAILED / CANCELLED from any
non-terminal state. A worker failure moves a request to MIGRATING, and from there it is placed
again (on other workers, continuing after the tokens already streamed). That includes a failure
while its KV was being reserved (still RECEIVED, or MIGRATING from an earlier failure). Timestamps come
from the caller's clock.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestState(enum.Enum):
    RECEIVED = "received"
    PLACED = "placed"
    WAITING_FOR_KV = "waiting_for_kv"   # prefill running, KV streaming to the decode worker
    DECODING = "decoding"
    MIGRATING = "migrating"             # its worker failed; being placed again
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ENDS = {RequestState.FAILED, RequestState.CANCELLED}
_TRANSITIONS = {
    RequestState.RECEIVED: {RequestState.PLACED, RequestState.MIGRATING, *_ENDS},
    RequestState.PLACED: {RequestState.WAITING_FOR_KV, RequestState.DECODING, RequestState.MIGRATING, *_ENDS},
    RequestState.WAITING_FOR_KV: {RequestState.DECODING, RequestState.MIGRATING, *_ENDS},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.MIGRATING, *_ENDS},
    RequestState.MIGRATING: {RequestState.PLACED, RequestState.MIGRATING, *_ENDS},
}
TERMINAL = frozenset({RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED})


@dataclass
class RequestTracker:
    """Explicit lifecycle of one request; timestamps come from the caller's clock."""

    req_id: str
    arrival_s: float
    state: RequestState = RequestState.RECEIVED
    history: list[tuple[RequestState, float]] = field(default_factory=list)
    first_token_s: float | None = None
    reason: str = ""

    def to(self, new: RequestState, now_s: float, reason: str = "") -> None:
        if new not in _TRANSITIONS.get(self.state, set()):
            raise ValueError(f"request {self.req_id}: illegal transition {self.state.value} -> {new.value}")
        self.state = new
        self.reason = reason or self.reason
        self.history.append((new, now_s))

    def first_token(self, now_s: float) -> None:
        if self.first_token_s is None:
            self.first_token_s = now_s
