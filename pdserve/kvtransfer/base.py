"""The KV transfer interface: one sender and one receiver per (request, transfer).

Lifecycle: the decode side creates a receiver for a transfer id with a known layout and a
destination buffer (one contiguous region, layer after layer) and publishes its agent's address;
the prefill side creates a sender to that address, calls `send_layer()` as each layer's KV is
computed (non-blocking: the backend moves bytes in the background, overlapping later layers'
compute), then `finish(trailer)`. Both sides `poll()` for a `TransferState`; `abort()` stops a
transfer from either side, and `failure()` says why a FAILED transfer failed. Every transfer has a
deadline: nothing waits forever. After DONE or FAILED the backend holds no reference to the caller's
buffers and the agent has forgotten the transfer.
"""
from __future__ import annotations

import abc
import enum
import hashlib
import secrets
import threading
import zlib
from dataclasses import dataclass

from pdserve.clock import Clock


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"   # created, peer not reached yet
    TRANSFERRING = "transferring"     # bytes moving
    DONE = "done"
    FAILED = "failed"


class KVTransferError(RuntimeError):
    pass


# Transfer ids are random capabilities below this (every backend's wire format carries 48 bits).
MAX_TRANSFER_ID = (1 << 48) - 1


@dataclass(frozen=True)
class TransferLayout:
    """What one transfer carries: the byte size of each layer's contiguous KV buffer.

    `token` is the transfer's secret capability: a receiver accepts only a sender presenting it,
    so knowing (or guessing) the transfer id is not enough to fail or fill another request's KV.
    Workers always set one (`new_token()`); an empty token is for benchmarks and unit tests."""

    transfer_id: int
    layer_nbytes: tuple[int, ...]
    token: bytes = b""

    @property
    def num_layers(self) -> int:
        return len(self.layer_nbytes)

    @property
    def total_nbytes(self) -> int:
        return sum(self.layer_nbytes)

    def layer_offset(self, layer_index: int) -> int:
        return sum(self.layer_nbytes[:layer_index])

    @property
    def wire_id(self) -> int:
        """What the data messages of this transfer are labelled with (UCX tags): derived from the
        token, so a sender without it cannot even address them; the transfer id otherwise."""
        return wire_id(self.transfer_id, self.token)


TOKEN_BYTES = 16


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def wire_id(transfer_id: int, token: bytes) -> int:
    if not token:
        return transfer_id
    digest = int.from_bytes(hashlib.blake2b(token, digest_size=8).digest(), "big")
    return digest % MAX_TRANSFER_ID + 1


def crc32(buf: memoryview) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


class TransferStatus:
    """Thread-safe state shared by a transfer's user and the backend thread that moves its bytes."""

    def __init__(self, clock: Clock, timeout_s: float):
        self._lock = threading.Lock()
        self._clock = clock
        self.deadline_s = clock.now_s() + timeout_s
        self._timeout_s = timeout_s
        self._state = TransferState.BOOTSTRAPPING
        self._failure: str | None = None
        self.finished = threading.Event()
        self._on_finish: list = []

    def poll(self) -> TransferState:
        with self._lock:
            timed_out = (self._state in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING)
                         and self._clock.now_s() > self.deadline_s)
            if timed_out:
                self._end(TransferState.FAILED, f"timed out after {self._timeout_s:.1f} s")
            state = self._state
        if timed_out:
            self._run_finish_callbacks()
        return state

    def add_finish_callback(self, fn) -> None:
        """`fn()` once the transfer has ended: at once if it has, else on the thread that ends it
        (an event loop's waiter hands it over with call_soon_threadsafe)."""
        with self._lock:
            if not self.finished.is_set():
                self._on_finish.append(fn)
                return
        fn()

    def failure(self) -> str | None:
        with self._lock:
            return self._failure

    def mark_transferring(self) -> None:
        with self._lock:
            if self._state is TransferState.BOOTSTRAPPING:
                self._state = TransferState.TRANSFERRING

    def mark_done(self) -> bool:
        with self._lock:
            if self._state in (TransferState.DONE, TransferState.FAILED):
                return False
            self._end(TransferState.DONE, None)
        self._run_finish_callbacks()
        return True

    def mark_failed(self, reason: str) -> bool:
        """First failure wins; returns False if the transfer had already ended."""
        with self._lock:
            if self._state in (TransferState.DONE, TransferState.FAILED):
                return False
            self._end(TransferState.FAILED, reason)
        self._run_finish_callbacks()
        return True

    def _end(self, state: TransferState, failure: str | None) -> None:
        """Under the lock."""
        self._state, self._failure = state, failure
        self.finished.set()

    def _run_finish_callbacks(self) -> None:
        with self._lock:
            callbacks, self._on_finish = self._on_finish, []
        for fn in callbacks:
            fn()

    def remaining_s(self) -> float:
        return self.deadline_s - self._clock.now_s()

    @property
    def active(self) -> bool:
        return self.poll() in (TransferState.BOOTSTRAPPING, TransferState.TRANSFERRING)


class _TransferEnd(abc.ABC):
    """What a sender and a receiver share: their layout, status, poll() and failure()."""

    def __init__(self, layout: TransferLayout, status: TransferStatus):
        self.layout = layout
        self.status = status

    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Stop the transfer, tell the peer if possible, release buffers. Idempotent."""

    def poll(self) -> TransferState:
        return self.status.poll()

    def failure(self) -> str | None:
        return self.status.failure()


class BaseKVSender(_TransferEnd):
    @abc.abstractmethod
    def send_layer(self, layer_index: int, buf: memoryview, crc32: int | None = None) -> None:
        """Queue one layer (non-blocking). `buf` must stay unchanged until the transfer ends.

        With checksums on, `crc32` may carry a checksum computed at the data's source; otherwise
        the backend computes it just before sending.
        """

    @abc.abstractmethod
    def finish(self, trailer: bytes) -> None:
        """Queue the trailer after the last layer; DONE once the receiver has everything."""


class BaseKVReceiver(_TransferEnd):
    def __init__(self, layout: TransferLayout, status: TransferStatus):
        super().__init__(layout, status)
        self.trailer: bytes | None = None
        self.num_layers_received = 0


class BaseKVAgent(abc.ABC):
    """One per worker process and backend: owns the connections and background threads."""

    backend_name: str

    @abc.abstractmethod
    def address(self) -> bytes:
        """Opaque address a peer passes to create_sender()."""

    @abc.abstractmethod
    def create_receiver(
        self, layout: TransferLayout, dest: memoryview, timeout_s: float
    ) -> BaseKVReceiver:
        """Arm a receiver; `dest` is writable, contiguous, layout.total_nbytes long."""

    @abc.abstractmethod
    def create_sender(
        self, peer_address: bytes, layout: TransferLayout, timeout_s: float, checksum: bool = False
    ) -> BaseKVSender:
        """Start a transfer to the receiver armed under layout.transfer_id at peer_address."""

    def check_peer_address(self, peer_address: bytes) -> str | None:
        """Why `peer_address` cannot be a peer of this backend, or None; checked where it arrives
        (a request), so a bad one is the caller's error rather than a failed transfer later."""
        return None if peer_address else "empty KV address"

    @abc.abstractmethod
    def num_active_transfers(self) -> int:
        """Senders and receivers not yet forgotten: zero when idle (leak checks use it)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Abort everything in flight and stop background threads."""


def as_bytes_view(buf) -> memoryview:
    """A flat byte view of a contiguous buffer (numpy array, bytearray, memoryview)."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("KV buffers must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
