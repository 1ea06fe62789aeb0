"""UCX backend (ucxx): tag messages between workers addressed by UCX worker address.

Endpoints are created from the peer's worker address (exchanged out of band over gRPC) with
endpoint error handling off: that path lets UCX pick shared memory between processes on one host
(measured ~5 GB/s vs ~0.6 GB/s for listener endpoints). With error handling off UCX will not tell
us a peer died, so every transfer has a deadline, and a receive is only ever posted for a message
that a probe has shown to be there; failed transfers' late messages are drained to scratch memory.

Tags are wire_id << 16 | slot, where the wire id derives from the transfer's secret token (see
TransferLayout.wire_id). Headers of all transfers go to the agent's inbox tag, so a transfer the
receiver does not know, or a header with the wrong token, is answered with an ERROR instead of
sitting in UCX's queue; a sender without the token cannot address the data tags at all.
Slot 1+2i carries the frame of layer i, 2+2i its payload, 1+2L the trailer's frame and 2+2L its
bytes (a trailer can outgrow a control slot: prompt logprobs); a header marked `frameless` (every
sender without a checksum) announces a transfer that leaves the frames out, the receiver taking
sizes from its probes. A sender posts its header after its first layer, and the receiver takes
payloads that come before their header (their tags and sizes say where they go; the header still
decides whether the transfer is good). The receiver answers ACK or ERROR on the sender's
ACK_SLOT, and a sender's ABORT goes to ABORT_SLOT, always watched.
Threads: a sender posts from the caller's thread (ucxx makes its workers thread-safe); everything
else runs on the agent's thread, which progresses the worker, steps the transfers' flows, and
sleeps on the worker's event descriptor when nothing can move (see _ucx_engine.py).
"""
from __future__ import annotations

import os
import threading
import time

from pdserve.clock import Clock
from pdserve.kvtransfer import frames
from pdserve.kvtransfer.base import (BaseKVAgent, BaseKVReceiver, BaseKVSender, TransferLayout,
                                     TransferStatus)
from pdserve.kvtransfer.backends._ucx_engine import DEFAULT_SPIN_S, Pending, UcxEngine
from pdserve.kvtransfer.backends._ucx_receive import DrainFlow, InboxFlow, ReceiveFlow
from pdserve.kvtransfer.backends._ucx_send import SendFlow
from pdserve.kvtransfer.backends._ucx_wire import (ACK_SLOT, MAX_LAYERS, MAX_TRANSFER_ID, tag, ucx_buffer,
                                                   ucx_tag)
from pdserve.v1 import kvtransfer_pb2 as pb

MAX_ADDRESS_BYTES = 64 << 10

class UcxReceiver(BaseKVReceiver):
    def __init__(self, agent: "UcxAgent", layout: TransferLayout, dest: memoryview, status: TransferStatus):
        super().__init__(layout, status)
        self._agent = agent
        self.dest = dest

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}"):
            self._agent.engine.wake()   # its flow ends now rather than at its deadline


class UcxSender(BaseKVSender):
    """Posts from the caller's thread (see _ucx_send.py)."""

    def __init__(self, agent: "UcxAgent", layout: TransferLayout, status: TransferStatus,
                 peer_address: bytes, checksum: bool):
        super().__init__(layout, status)
        self.flow = SendFlow(agent, self, peer_address, checksum)

    def send_layer(self, layer_index: int, buf: memoryview, crc32: int | None = None) -> None:
        self.flow.send_layer(layer_index, buf, crc32)

    def finish(self, trailer: bytes) -> None:
        self.flow.finish(trailer)

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}"):
            self.flow.abort()


# UCX writes its log (warnings included) to stdout unless told otherwise, which breaks every
# command that prints a JSON document there.
_UCX_LOG_DESTINATION = "stderr"
# ucxx sets UCX_MEMTYPE_CACHE=n on import for older UCX builds; the UCX it ships (1.21) no longer
# has that option and warns about it on every context.
_FIRST_UCX_WITHOUT_MEMTYPE_CACHE = (1, 21)


def _prepare_ucx_environment() -> None:
    """Called before UCX reads its configuration (the first context). UCX takes its options from
    the process environment only, so this adapter sets them here, and nowhere else does."""
    os.environ.setdefault("UCX_LOG_FILE", _UCX_LOG_DESTINATION)
    user_set_memtype_cache = "UCX_MEMTYPE_CACHE" in os.environ
    import ucxx
    if not user_set_memtype_cache and tuple(ucxx.get_ucx_version()) >= _FIRST_UCX_WITHOUT_MEMTYPE_CACHE:
        os.environ.pop("UCX_MEMTYPE_CACHE", None)


class UcxAgent(BaseKVAgent):
    backend_name = "ucx"

    def __init__(self, clock: Clock, tls: str = "tcp,sm,self", stall_timeout_s: float = 10.0,
                 spin_s: float = DEFAULT_SPIN_S):
        self._clock = clock
        self._spin_s = spin_s
        self.stall_timeout_s = stall_timeout_s
        # Senders leave per-layer frames out unless they checksum. Receivers take either form:
        # False makes this agent send as releases before the frameless form did (for tests).
        self.frameless_sends = True
        self._ready = threading.Event()
        self._num_active = 0
        self._lock = threading.Lock()
        self._endpoints: dict[bytes, object] = {}
        self._endpoints_lock = threading.Lock()
        self.armed: dict[int, ReceiveFlow] = {}   # set by create_receiver, read by the inbox
        self._init_error: Exception | None = None
        _prepare_ucx_environment()
        self._thread = threading.Thread(target=self._run, args=(tls,), name="kv-ucx", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error

    def _run(self, tls: str) -> None:
        try:
            from ucxx._lib import libucxx
            self._ucx_context = libucxx.UCXContext({"TLS": tls})
            self.worker = libucxx.UCXWorker(self._ucx_context, enable_delayed_submission=False,
                                            enable_python_future=False)
            self._address = bytes(self.worker.address)
            self.engine = UcxEngine(self.worker, self._spin_s)
            self.engine.add(InboxFlow(self))
        except Exception as exc:  # surfaced to the constructor's caller
            self._init_error = exc
        self._ready.set()
        if self._init_error is None:
            self.engine.run()

    def address(self) -> bytes:
        return self._address

    def track(self, delta: int) -> None:
        with self._lock:
            self._num_active += delta

    def num_active_transfers(self) -> int:
        with self._lock:
            return self._num_active

    def create_receiver(self, layout: TransferLayout, dest: memoryview, timeout_s: float) -> UcxReceiver:
        self._check_layout(layout)
        if len(dest) != layout.total_nbytes:
            raise ValueError(f"destination holds {len(dest)} bytes, layout needs {layout.total_nbytes}")
        rx = UcxReceiver(self, layout, dest, TransferStatus(self._clock, timeout_s))
        self.track(+1)
        # Armed before this returns: the inbox's posted receive takes a header the moment it
        # arrives, which can be before the engine first steps the flow. A dict store is atomic.
        flow = ReceiveFlow(self, rx)
        self.armed[layout.transfer_id] = flow
        self.engine.call_soon(self.engine.add, flow)
        return rx

    def create_sender(self, peer_address: bytes, layout: TransferLayout, timeout_s: float,
                      checksum: bool = False) -> UcxSender:
        self._check_layout(layout)
        self.track(+1)
        tx = UcxSender(self, layout, TransferStatus(self._clock, timeout_s), peer_address, checksum)
        # Its first layer wakes the engine: a wake-up for the flow alone would find nothing to do.
        self.engine.call_later_soon(self.engine.add, tx.flow)
        return tx

    @staticmethod
    def _check_layout(layout: TransferLayout) -> None:
        if layout.num_layers > MAX_LAYERS or not 1 <= layout.transfer_id <= MAX_TRANSFER_ID:
            raise ValueError(f"layout out of range for UCX tags: {layout.num_layers} layers, "
                             f"transfer id {layout.transfer_id}")

    def close(self) -> None:
        self.engine.close()

    def check_peer_address(self, peer_address: bytes) -> str | None:
        """UCX asserts (aborting the process) on a worker address of another format version, so
        an address is only handed to it when its header byte matches ours: same UCX, same format."""
        if not 1 < len(peer_address) <= MAX_ADDRESS_BYTES or peer_address[0] != self._address[0]:
            return f"not a UCX worker address of this UCX version ({len(peer_address)} bytes)"
        return None

    # ---- for the flows: any thread (ucxx's workers are thread-safe) ----
    def endpoint(self, peer_address: bytes):
        with self._endpoints_lock:
            ep = self._endpoints.get(peer_address)
            if ep is None:
                if problem := self.check_peer_address(peer_address):
                    raise ValueError(problem)
                from ucxx._lib import libucxx
                ep = libucxx.UCXEndpoint.create_from_worker_address(
                    self.worker, libucxx.UCXAddress.create_from_buffer(peer_address), False)
                self._endpoints[peer_address] = ep
            return ep

    @staticmethod
    def post_send(ep, buf, buf_tag: int) -> Pending:
        """A send its poster completes (Pending.poll), and hands to the engine if it gives up."""
        array = ucx_buffer(buf)
        return Pending(ep.tag_send(array, ucx_tag(buf_tag)), array)

    # ---- for the flows, on the engine's thread ----
    def send(self, ep, buf, buf_tag: int) -> Pending:
        return self.engine.adopt(self.post_send(ep, buf, buf_tag))

    def probe(self, wanted: int):
        found = self.worker.tag_probe(ucx_tag(wanted), remove=True)
        return found if found.matched else None

    def take(self, found, buf) -> Pending:
        """Receive a probed message into `buf`."""
        array = ucx_buffer(buf)
        return self.engine.post(self.worker.tag_recv_with_handle(array, found), array, buf)

    def take_if_arrived(self, wanted: int) -> Pending | None:
        """The receive of the message on `wanted`, into a buffer of its size, if one has arrived."""
        found = self.probe(wanted)
        return None if found is None else self.take(found, bytearray(found.length))

    @staticmethod
    def frame_of(pending: Pending) -> pb.KVFrame:
        """The control frame a completed take received."""
        if pending.error is not None:
            raise pending.error
        if len(pending.data) != frames.SLOT_BYTES:
            raise ValueError(f"malformed control frame of {len(pending.data)} bytes")
        return frames.decode_slot(pending.data)

    def reply(self, address: bytes, wire: int, frame: pb.KVFrame) -> None:
        """Best effort: the peer's own deadline covers a lost reply."""
        try:
            self.send(self.endpoint(address), frames.encode_slot(frame), tag(wire, ACK_SLOT))
        except Exception:
            pass

    def drain(self, wire: int, num_layers: int) -> None:
        self.engine.add(DrainFlow(self, wire, num_layers, time.monotonic()))
