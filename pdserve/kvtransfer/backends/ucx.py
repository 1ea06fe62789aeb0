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
A sender posts its header after the layers queued when it starts, so one wake-up of the
receiver finds both; data that comes before its header waits in UCX's queue like any other.
Slot 1+2i carries the frame of layer i, 2+2i its payload, 1+2L the trailer's frame and 2+2L its
bytes (a trailer can outgrow a control slot: prompt logprobs); a header marked `frameless` (every
sender without a checksum) announces a transfer that leaves the frames out, the receiver taking
sizes from its probes. The receiver answers
ACK or ERROR on the sender's ACK_SLOT, and a sender's ABORT goes to ABORT_SLOT, always watched.
All UCX calls run on one background thread with its own event loop, which also progresses the
worker when UCX signals an event (see _ucx_progress.py): no progress thread, no polling.
"""
from __future__ import annotations

import asyncio
import collections
import os
import threading

from pdserve.clock import Clock
from pdserve.kvtransfer import frames
from pdserve.kvtransfer.base import (BaseKVAgent, BaseKVReceiver, BaseKVSender, TransferLayout,
                                     TransferStatus)
from pdserve.kvtransfer.backends._ucx_flows import UcxFlows
from pdserve.kvtransfer.backends._ucx_progress import UcxProgress
from pdserve.kvtransfer.backends._ucx_wire import (ACK_SLOT, ABORT_SLOT, MAX_LAYERS, MAX_TRANSFER_ID,
                                                   DRAIN_POLL_S, DRAIN_S, REPLY_TIMEOUT_S, Aborted,
                                                   frame_slot, tag, ucx_buffer, ucx_tag, wait_active)
from pdserve.v1 import kvtransfer_pb2 as pb

MAX_ADDRESS_BYTES = 64 << 10

class UcxReceiver(BaseKVReceiver):
    def __init__(self, agent: "UcxAgent", layout: TransferLayout, dest: memoryview, status: TransferStatus):
        super().__init__(layout, status)
        self._agent = agent
        self.dest = dest

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}"):
            # Wake a receive still waiting for its header, so it ends now rather than at its deadline.
            self._agent.call_soon(self._agent.wake_receiver, self.layout.transfer_id)


class UcxSender(BaseKVSender):
    """The caller's thread appends work to `items`; the agent's loop takes it. The loop is woken
    only while it waits for work (`waiter` set): a wake-up costs a system call and a loop turn,
    and layers queued back to back need one at most."""

    def __init__(self, agent: "UcxAgent", layout: TransferLayout, status: TransferStatus):
        super().__init__(layout, status)
        self._agent = agent
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None    # the loop's, while it waits for items

    def send_layer(self, layer_index: int, buf: memoryview, crc32: int | None = None) -> None:
        self._put(("layer", layer_index, buf, crc32))

    def finish(self, trailer: bytes) -> None:
        self._put(("trailer", trailer))

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}"):
            self._put(("abort", reason))

    def _put(self, item) -> None:
        # Append before looking at the waiter; the loop sets its waiter before it looks at the
        # items again (UcxFlows._next_item), so one of the two always sees the other's write.
        self.items.append(item)
        if self.waiter is not None:
            self._agent.call_soon(self.wake)

    def wake(self) -> None:
        """Loop thread."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


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


class UcxAgent(UcxFlows, BaseKVAgent):
    backend_name = "ucx"

    def __init__(self, clock: Clock, tls: str = "tcp,sm,self", stall_timeout_s: float = 10.0):
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        # Senders leave per-layer frames out unless they checksum. Receivers take either form:
        # False makes this agent send as releases before the frameless form did (for tests).
        self.frameless_sends = True
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self._num_active = 0
        self._lock = threading.Lock()
        self._endpoints: dict[bytes, object] = {}
        self._armed: dict[int, tuple[asyncio.Future, TransferLayout]] = {}   # set by create_receiver
        self._inbox_buf = bytearray(frames.SLOT_BYTES)   # the inbox's posted receive (agent-lived)
        self._init_error: Exception | None = None
        _prepare_ucx_environment()
        self._thread = threading.Thread(target=self._run_loop, args=(tls,), name="kv-ucx", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._init_error is not None:
            raise self._init_error
        self._spawn(self._inbox_loop())

    def _run_loop(self, tls: str) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            from ucxx._lib import libucxx
            self._ucx_context = libucxx.UCXContext({"TLS": tls})
            self._worker = libucxx.UCXWorker(self._ucx_context, enable_delayed_submission=False,
                                             enable_python_future=False)
            self._address = bytes(self._worker.address)
            self._progress = UcxProgress(self._worker, self._loop)
        except Exception as exc:  # surfaced to the constructor's caller
            self._init_error = exc
        self._ready.set()
        if self._init_error is None:
            self._loop.run_forever()

    def call_soon(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _spawn(self, coro) -> None:
        def start() -> None:
            task = self._loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.call_soon(start)

    def address(self) -> bytes:
        return self._address

    def _track(self, delta: int) -> None:
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
        self._track(+1)
        # Armed before this returns: the inbox's posted receive takes a header the moment it
        # arrives, which can be before a spawned coroutine first runs. The waiter is resolved on
        # the loop thread only; a dict store is atomic.
        waiter = self._loop.create_future()
        self._armed[layout.transfer_id] = (waiter, layout)
        self._spawn(self._receive(rx, waiter))
        return rx

    def create_sender(self, peer_address: bytes, layout: TransferLayout, timeout_s: float,
                      checksum: bool = False) -> UcxSender:
        self._check_layout(layout)
        tx = UcxSender(self, layout, TransferStatus(self._clock, timeout_s))
        self._track(+1)
        self._spawn(self._send(tx, peer_address, checksum))
        return tx

    def wake_receiver(self, transfer_id: int) -> None:
        """Loop thread: end the header wait of an aborted receiver."""
        waiter, _ = self._armed.get(transfer_id, (None, None))
        if waiter is not None and not waiter.done():
            waiter.set_exception(Aborted())

    @staticmethod
    def _check_layout(layout: TransferLayout) -> None:
        if layout.num_layers > MAX_LAYERS or not 1 <= layout.transfer_id <= MAX_TRANSFER_ID:
            raise ValueError(f"layout out of range for UCX tags: {layout.num_layers} layers, "
                             f"transfer id {layout.transfer_id}")

    def close(self) -> None:
        def cancel_all() -> None:
            for task in list(self._tasks):
                task.cancel()
            self._progress.close()
        self.call_soon(cancel_all)

    def check_peer_address(self, peer_address: bytes) -> str | None:
        """UCX asserts (aborting the process) on a worker address of another format version, so
        an address is only handed to it when its header byte matches ours: same UCX, same format."""
        if not 1 < len(peer_address) <= MAX_ADDRESS_BYTES or peer_address[0] != self._address[0]:
            return f"not a UCX worker address of this UCX version ({len(peer_address)} bytes)"
        return None

    # ---- helpers on the loop thread (the flows themselves are in _ucx_flows.py) ----
    async def _endpoint(self, peer_address: bytes):
        ep = self._endpoints.get(peer_address)
        if ep is None:
            if problem := self.check_peer_address(peer_address):
                raise ValueError(problem)
            from ucxx._lib import libucxx
            ep = libucxx.UCXEndpoint.create_from_worker_address(
                self._worker, libucxx.UCXAddress.create_from_buffer(peer_address), False)
            self._endpoints[peer_address] = ep
        return ep

    async def _io(self, request, buf, timeout_s: float, status: TransferStatus | None = None):
        """Await one posted UCX request for at most `timeout_s`, and, with `status`, only while
        the transfer is active. Giving up on the wait (deadline, abort, close) does not end the
        request, which may still read or write `buf`: the progress keeps the buffer alive until
        UCX completes it, so it never touches freed memory."""
        return await wait_active(self._progress.wait(request, buf), timeout_s, status)

    async def _bounded_io(self, post, buf, status: TransferStatus):
        """`_io` of the request `post()` makes, within the transfer's deadline; Aborted, and
        nothing posted, once the transfer has ended."""
        remaining = status.remaining_s()
        if remaining <= 0 or not status.active:
            raise Aborted()
        return await self._io(post(), buf, remaining, status)

    async def _send_frame(self, ep, frame: pb.KVFrame, frame_tag: int, status: TransferStatus | None) -> None:
        data = ucx_buffer(frames.encode_slot(frame))
        if status is None:
            await self._io(ep.tag_send(data, ucx_tag(frame_tag)), data, REPLY_TIMEOUT_S)
        else:
            await self._bounded_io(lambda: ep.tag_send(data, ucx_tag(frame_tag)), data, status)

    async def _reply(self, address: bytes, wire_id: int, frame: pb.KVFrame) -> None:
        try:
            ep = await asyncio.wait_for(self._endpoint(address), REPLY_TIMEOUT_S)
            await self._send_frame(ep, frame, tag(wire_id, ACK_SLOT), None)
        except Exception:  # best effort: the peer's own deadline covers a lost reply
            pass

    async def _bounded(self, awaitable, status: TransferStatus):
        """Await within the transfer's deadline; raise Aborted once it has ended."""
        remaining = status.remaining_s()
        if remaining <= 0 or not status.active:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise Aborted()
        return await asyncio.wait_for(awaitable, remaining)

    def _probe(self, wanted: int):
        found = self._worker.tag_probe(ucx_tag(wanted), remove=True)
        return found if found.matched else None

    def _post_take(self, found, buf) -> asyncio.Future:
        """Receive a probed message into `buf`; the future ends when UCX has completed it (the
        progress keeps `buf` until then)."""
        array = ucx_buffer(buf)
        return self._progress.wait(self._worker.tag_recv_with_handle(array, found), array)

    async def _take(self, found, buf) -> None:
        await wait_active(self._post_take(found, buf), self._stall_timeout_s)

    async def _take_frame(self, found) -> pb.KVFrame:
        buf = bytearray(found.length)
        await self._take(found, buf)
        if found.length != frames.SLOT_BYTES:
            raise ValueError(f"malformed control frame of {found.length} bytes")
        return frames.decode_slot(buf)

    async def _drain(self, wire_id: int, num_layers: int) -> None:
        """Discard late messages of a failed transfer so they do not sit in UCX memory."""
        slots = [*range(1, frame_slot(num_layers) + 2), ABORT_SLOT]
        end_s = self._clock.now_s() + DRAIN_S
        while self._clock.now_s() < end_s:
            for slot in slots:
                if (found := self._probe(tag(wire_id, slot))) is not None:
                    await self._take(found, bytearray(found.length))
            await asyncio.sleep(DRAIN_POLL_S)
