"""Fault injection around any KV agent, for reliability tests: drop, truncate, corrupt or delay
layers, or stop a transfer half way as a dying peer would."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdserve.kvtransfer.base import BaseKVAgent, BaseKVReceiver, BaseKVSender, TransferLayout, crc32


@dataclass(frozen=True)
class Faults:
    drop_layers: frozenset[int] = field(default_factory=frozenset)
    truncate_layers: frozenset[int] = field(default_factory=frozenset)
    corrupt_layers: frozenset[int] = field(default_factory=frozenset)
    delay_per_layer_s: float = 0.0
    # Stop sending (no trailer, no abort) after this many layers: what a crashed peer looks like.
    vanish_after_layers: int | None = None


class FaultySender(BaseKVSender):
    def __init__(self, inner: BaseKVSender, faults: Faults):
        super().__init__(inner.layout, inner.status)
        self._inner = inner
        self._faults = faults
        self._num_sent = 0
        self._kept: list[bytearray] = []  # corrupted copies must outlive the send

    def _vanished(self) -> bool:
        limit = self._faults.vanish_after_layers
        return limit is not None and self._num_sent >= limit

    def send_layer(self, layer_index: int, buf: memoryview, crc32_given: int | None = None) -> None:
        f = self._faults
        if self._vanished():
            return
        self._num_sent += 1
        if f.delay_per_layer_s:
            time.sleep(f.delay_per_layer_s)
        if layer_index in f.drop_layers:
            return
        if layer_index in f.truncate_layers:
            buf = buf[: len(buf) // 2]
        source_crc = crc32(buf)  # what the data was before it was damaged "in flight"
        if layer_index in f.corrupt_layers:
            copy = bytearray(buf)
            copy[len(copy) // 2] ^= 0xFF
            self._kept.append(copy)
            buf = memoryview(copy)
        self._inner.send_layer(layer_index, buf, source_crc)

    def finish(self, trailer: bytes) -> None:
        if not self._vanished():
            self._inner.finish(trailer)

    def abort(self, reason: str) -> None:
        self._inner.abort(reason)


class FaultyAgent(BaseKVAgent):
    """Wraps an agent so every sender it creates misbehaves as `faults` says."""

    def __init__(self, inner: BaseKVAgent, faults: Faults):
        self._inner = inner
        self.faults = faults
        self.backend_name = inner.backend_name

    def address(self) -> bytes:
        return self._inner.address()

    def create_receiver(self, layout: TransferLayout, dest: memoryview, timeout_s: float) -> BaseKVReceiver:
        return self._inner.create_receiver(layout, dest, timeout_s)

    def create_sender(self, peer_address: bytes, layout: TransferLayout, timeout_s: float,
                      checksum: bool = False) -> BaseKVSender:
        inner = self._inner.create_sender(peer_address, layout, timeout_s, checksum)
        return FaultySender(inner, self.faults)

    def num_active_transfers(self) -> int:
        return self._inner.num_active_transfers()

    def close(self) -> None:
        self._inner.close()
