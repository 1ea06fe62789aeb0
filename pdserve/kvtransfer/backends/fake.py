"""In-process backend for unit tests and warm-up: agents on one `FakeFabric` copy bytes directly.

It honours the same contract as the real backends (layout checks, checksums, deadlines, abort,
unknown transfer ids), so tests of the workers' error paths run without sockets.
"""
from __future__ import annotations

import itertools
import threading

from pdserve.clock import Clock
from pdserve.kvtransfer import frames
from pdserve.kvtransfer.base import (BaseKVAgent, BaseKVReceiver, BaseKVSender, TransferLayout,
                                     TransferState, TransferStatus, crc32)


_crc = crc32


class FakeFabric:
    """The 'network' shared by fake agents: address -> agent."""

    def __init__(self):
        self._agents: dict[bytes, "FakeAgent"] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def attach(self, agent: "FakeAgent") -> bytes:
        with self._lock:
            address = f"fake-{next(self._ids)}".encode()
            self._agents[address] = agent
        return address

    def lookup(self, address: bytes) -> "FakeAgent | None":
        with self._lock:
            return self._agents.get(address)


class FakeReceiver(BaseKVReceiver):
    def __init__(self, agent: "FakeAgent", layout: TransferLayout, dest: memoryview, status: TransferStatus):
        super().__init__(layout, status)
        self._agent = agent
        self.dest = dest

    def abort(self, reason: str) -> None:
        self.status.mark_failed(f"aborted: {reason}")
        self._agent.forget(self.layout.transfer_id)

    def deliver_layer(self, index: int, buf: memoryview, checksum: int | None) -> str | None:
        if not self.status.active:
            return self.status.failure() or "receiver gone"
        if index != self.num_layers_received or index >= self.layout.num_layers \
                or len(buf) != self.layout.layer_nbytes[index]:
            return f"layer {index} of {len(buf)} bytes does not match the layout"
        offset = self.layout.layer_offset(index)
        self.status.mark_transferring()
        self.dest[offset: offset + len(buf)] = buf
        if checksum is not None and crc32(self.dest[offset: offset + len(buf)]) != checksum:
            return f"checksum mismatch in layer {index}"
        self.num_layers_received += 1
        return None

    def deliver_trailer(self, trailer: bytes) -> str | None:
        if self.num_layers_received != self.layout.num_layers:
            return f"trailer after {self.num_layers_received} of {self.layout.num_layers} layers"
        self.trailer = trailer
        self.status.mark_done()
        self._agent.forget(self.layout.transfer_id)
        return None


class FakeSender(BaseKVSender):
    def __init__(self, rx: FakeReceiver | None, layout: TransferLayout, status: TransferStatus, checksum: bool):
        super().__init__(layout, status)
        self._rx = rx
        self._checksum = checksum
        if rx is None:
            status.mark_failed(f"receiver refused: unknown transfer id {layout.transfer_id}")
        elif problem := frames.check_header(frames.header(layout, checksum), rx.layout):
            # As the real backends do: a sender that does not fit is refused and the receiver
            # stays armed for the sender it was reserved for.
            status.mark_failed(f"receiver refused: {problem}")
            self._rx = None

    def send_layer(self, layer_index: int, buf: memoryview, crc32: int | None = None) -> None:
        checksum = None
        if self._checksum:
            checksum = crc32 if crc32 is not None else _crc(buf)
        self._deliver(lambda rx: rx.deliver_layer(layer_index, buf, checksum))

    def finish(self, trailer: bytes) -> None:
        if self._deliver(lambda rx: rx.deliver_trailer(trailer)):
            self.status.mark_done()

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}") and self._rx is not None:
            self._rx.status.mark_failed(f"sender aborted: {reason}")

    def _deliver(self, action) -> bool:
        if not self.status.active or self._rx is None:
            return False
        problem = action(self._rx)
        if problem:
            self.status.mark_failed(problem)
            self._rx.status.mark_failed(problem)
            return False
        self.status.mark_transferring()
        return True


class FakeAgent(BaseKVAgent):
    backend_name = "fake"

    def __init__(self, clock: Clock, fabric: FakeFabric | None = None):
        self._clock = clock
        self._fabric = fabric or FakeFabric()
        self._address = self._fabric.attach(self)
        self._receivers: dict[int, FakeReceiver] = {}
        self._lock = threading.Lock()

    def address(self) -> bytes:
        return self._address

    def create_receiver(self, layout: TransferLayout, dest: memoryview, timeout_s: float) -> FakeReceiver:
        if len(dest) != layout.total_nbytes:
            raise ValueError(f"destination holds {len(dest)} bytes, layout needs {layout.total_nbytes}")
        rx = FakeReceiver(self, layout, dest, TransferStatus(self._clock, timeout_s))
        with self._lock:
            self._receivers[layout.transfer_id] = rx
        return rx

    def create_sender(self, peer_address: bytes, layout: TransferLayout, timeout_s: float,
                      checksum: bool = False) -> FakeSender:
        peer = self._fabric.lookup(peer_address)
        rx = peer.receiver(layout.transfer_id) if peer is not None else None
        return FakeSender(rx, layout, TransferStatus(self._clock, timeout_s), checksum)

    def receiver(self, transfer_id: int) -> FakeReceiver | None:
        with self._lock:
            return self._receivers.get(transfer_id)

    def forget(self, transfer_id: int) -> None:
        with self._lock:
            self._receivers.pop(transfer_id, None)

    def num_active_transfers(self) -> int:
        with self._lock:
            stale = [t for t, rx in self._receivers.items() if rx.poll() is TransferState.FAILED]
            for t in stale:
                del self._receivers[t]
            return len(self._receivers)

    def close(self) -> None:
        with self._lock:
            receivers = list(self._receivers.values())
        for rx in receivers:
            rx.abort("agent closed")
