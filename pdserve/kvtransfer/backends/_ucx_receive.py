"""The receiving side of UCX transfers, stepped by the engine's loop: the inbox that routes
headers, each transfer's receive, and the drain of a failed transfer's late messages."""
from __future__ import annotations

from pdserve.kvtransfer import frames
from pdserve.kvtransfer.backends._ucx_wire import (ABORT_SLOT, DRAIN_S, INBOX_TAG, Aborted, Flow,
                                                   frame_slot, tag, ucx_buffer, ucx_tag)
from pdserve.kvtransfer.base import crc32, wire_id
from pdserve.v1 import kvtransfer_pb2 as pb


class InboxFlow(Flow):
    """Routes incoming headers to armed receivers and refuses unknown transfers at once. It keeps
    one receive posted (not probed): a header lands in it as it arrives. Its buffer belongs to
    the agent, so the receive may stay posted for the agent's lifetime."""

    def __init__(self, agent):
        self._agent = agent
        self._buf = bytearray(frames.SLOT_BYTES)
        self._pending = self._post()

    def _post(self):
        array = ucx_buffer(self._buf)
        return self._agent.engine.post(self._agent.worker.tag_recv(array, ucx_tag(INBOX_TAG)), array)

    def step(self, now_s: float) -> bool:
        if not self._pending.done:
            return False
        head = None
        if self._pending.error is None:
            try:
                head = frames.decode_slot(bytes(self._buf))
            except Exception:
                pass                  # truncated or malformed: it names no transfer to answer
        self._pending = self._post()
        if head is not None:
            self._route(head)
        return True

    def _route(self, head: pb.KVFrame) -> None:
        agent = self._agent
        flow = agent.armed.get(head.transfer_id)
        wire = wire_id(head.transfer_id, head.transfer_token)
        # A header without the transfer's token is refused before the receiver sees it, which
        # stays armed for the sender it was reserved for. A sender holding the token shares the
        # transfer's tags, so its bad header (wrong layout) fails the receive itself.
        if flow is None or flow.head is not None:
            reason = f"unknown or expired transfer id {head.transfer_id}"
        elif (reason := frames.check_header(head, flow.layout)) is None or wire == flow.layout.wire_id:
            flow.head = head
            return
        agent.reply(head.reply_address, wire, pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=reason))
        agent.drain(wire, head.num_layers)


class DrainFlow(Flow):
    """Discards late messages of a failed transfer so they do not sit in UCX memory."""

    def __init__(self, agent, wire: int, num_layers: int, now_s: float):
        self._agent = agent
        self._tags = [tag(wire, slot) for slot in (*range(1, frame_slot(num_layers) + 2), ABORT_SLOT)]
        self._end_s = now_s + DRAIN_S
        self._now_s = now_s

    def wake_at_s(self) -> float:
        return self._end_s - self._now_s

    def step(self, now_s: float) -> bool:
        self._now_s = now_s
        moved = False
        for t in self._tags:
            moved |= self._agent.take_if_arrived(t) is not None
        self.finished = now_s >= self._end_s
        return moved


class ReceiveFlow(Flow):
    """Each layer (its frame, unless frameless, and its payload) is received into place as soon
    as it has arrived, without waiting for the previous layer's receive: consecutive layers'
    rendezvous reads overlap. Frames and checksums are checked in order once all completed.
    A failure is reported only once no receive still writes into the destination, which goes
    back to the pool then."""

    def __init__(self, agent, rx):
        self._agent, self._rx = agent, rx
        self.layout = rx.layout
        self.head: pb.KVFrame | None = None       # set by the inbox
        self._checked = False
        self._next_layer = 0             # the next payload to take
        self._offset = 0
        self._frames: list = []          # each layer's frame take (none when frameless)
        self._takes: list = []           # every take that writes into the destination
        self._scratch: list = []         # takes of messages discarded (wrong size)
        self._trailer = None             # (take, expected size or None) of the trailer's bytes
        self._trailer_frame = None       # the framed form's trailer frame take
        self._trailer_bytes: bytes | None = None
        self._aborted = None             # the take of the sender's abort frame
        self._stall_end_s: float | None = None
        self._failure: str | None = None
        self._now_s = 0.0

    def wake_at_s(self) -> float:
        if self._failure is not None or self._stalling():
            return self._stall_end_s - self._now_s
        return self._rx.status.remaining_s()

    def _stalling(self) -> bool:
        """Receives posted into the destination and not completed yet (bounded by the stall
        timeout once every layer's receive is posted)."""
        return self._stall_end_s is not None and not all(t.done for t in self._takes)

    def close(self) -> None:
        self._rx.status.mark_failed("ucx agent closed")
        self._end()

    def step(self, now_s: float) -> bool:
        self._now_s = now_s
        if self._failure is not None:
            return self._finish_failure(now_s)
        try:
            moved = self._take_payloads(now_s)
            if self.head is not None:
                moved |= self._check_header() | self._check_abort() | self._take_frames() | self._take_trailer()
            if self._complete():
                self._succeed()
                return True
            if not self._rx.status.active or self._rx.status.remaining_s() <= 0:
                raise Aborted()
            if self._stalling() and now_s > self._stall_end_s:
                raise Aborted()
            return moved
        except Aborted:
            self._fail("timed out", now_s)
        except Exception as exc:
            self._fail(f"ucx receive failed: {exc}", now_s)
        return True

    # ---- the transfer's steps ----
    def _check_header(self) -> bool:
        if self._checked:
            return False
        checksum = self.head.checksum == pb.CHECKSUM_KIND_CRC32
        problem = frames.check_header(self.head, self.layout) or (
            "a frameless transfer cannot carry checksums" if self.head.frameless and checksum else None)
        if problem:
            raise ValueError(problem)
        self._checked = True
        self._rx.status.mark_transferring()
        return True

    def _check_abort(self) -> bool:
        if self._aborted is None:
            self._aborted = self._agent.take_if_arrived(tag(self.layout.wire_id, ABORT_SLOT))
            return self._aborted is not None
        if self._aborted.done:
            raise ValueError(f"sender aborted: {self._agent.frame_of(self._aborted).reason}")
        return False

    def _take_payloads(self, now_s: float) -> bool:
        """Payloads are taken as they arrive, before the header if they come first (the sender
        posts its header after them): a payload's tag and size say where it goes, and no one
        without the transfer's token can address these tags. The header still decides whether
        the transfer is good before it is DONE."""
        moved = False
        layout = self.layout
        while self._next_layer < layout.num_layers:
            index = self._next_layer
            if (found := self._agent.probe(tag(layout.wire_id, frame_slot(index) + 1))) is None:
                break
            nbytes = layout.layer_nbytes[index]
            if found.length != nbytes:
                self._discard(found)
                raise ValueError(f"KV payload of layer {index} is {found.length} bytes, expected {nbytes} "
                                 "(truncated or corrupted)")
            self._takes.append(self._agent.take(found, self._rx.dest[self._offset: self._offset + nbytes]))
            self._offset += nbytes
            self._next_layer += 1
            moved = True
        if self._next_layer == layout.num_layers and self._stall_end_s is None:
            self._stall_end_s = now_s + self._agent.stall_timeout_s
        return moved

    def _take_frames(self) -> bool:
        """A framed transfer's layer frames (checked once all arrived)."""
        moved = False
        while not self.head.frameless and len(self._frames) < self.layout.num_layers:
            index = len(self._frames)
            if (found := self._agent.probe(tag(self.layout.wire_id, frame_slot(index)))) is None:
                break
            if found.length != frames.SLOT_BYTES:
                self._discard(found)
                raise ValueError(f"malformed control frame of {found.length} bytes")
            self._frames.append(self._agent.take(found, bytearray(frames.SLOT_BYTES)))
            moved = True
        return moved

    def _take_trailer(self) -> bool:
        """The trailer's bytes (their size from the probe when frameless, else from its frame)."""
        if self._next_layer < self.layout.num_layers or self._trailer is not None:
            return False
        slot = frame_slot(self.layout.num_layers)
        expected = None
        if not self.head.frameless:
            if self._trailer_frame is None:
                self._trailer_frame = self._agent.take_if_arrived(tag(self.layout.wire_id, slot))
                return self._trailer_frame is not None
            if not self._trailer_frame.done:
                return False
            expected = self._trailer_size(self._agent.frame_of(self._trailer_frame))
            if expected == 0:
                self._trailer = (None, 0)
                return True
        if (found := self._agent.probe(tag(self.layout.wire_id, slot + 1))) is None:
            return False
        if found.length > frames.MAX_TRAILER_BYTES:
            self._discard(found)
            raise ValueError(f"trailer of {found.length} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        if expected is not None and found.length != expected:
            self._discard(found)
            raise ValueError(f"trailer is {found.length} bytes, its frame says {expected}")
        self._trailer = (self._agent.take(found, bytearray(found.length)), found.length)
        return True

    def _trailer_size(self, tail: pb.KVFrame) -> int:
        if tail.kind != pb.KV_FRAME_KIND_TRAILER:
            raise ValueError(frames.check_layer(tail, self.layout.num_layers, self.layout) or "expected trailer")
        if tail.payload_bytes > frames.MAX_TRAILER_BYTES:
            raise ValueError(f"trailer of {tail.payload_bytes} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        return tail.payload_bytes

    def _complete(self) -> bool:
        """True once every take completed and checked out; raises what went wrong."""
        if self._trailer is None or not self._checked:
            return False
        if not self.head.frameless and len(self._frames) < self.layout.num_layers:
            return False
        pending = [t for t in (*self._takes, *self._frames, self._trailer[0]) if t is not None]
        if not all(t.done for t in pending):
            return False
        for t in pending:
            if t.error is not None:
                raise t.error
        checksum = self.head.checksum == pb.CHECKSUM_KIND_CRC32
        offset = 0
        for index in range(self.layout.num_layers):
            frame_take = self._frames[index] if self._frames else None
            nbytes = self.layout.layer_nbytes[index]
            frame = None if frame_take is None else frames.decode_slot(bytes(frame_take.data))
            if frame is not None and (problem := frames.check_layer(frame, index, self.layout)):
                raise ValueError(problem)
            if checksum and crc32(self._rx.dest[offset: offset + nbytes]) != frame.crc32:
                raise ValueError(f"checksum mismatch in layer {index}")
            offset += nbytes
            self._rx.num_layers_received = index + 1
        take = self._trailer[0]
        self._trailer_bytes = b"" if take is None else bytes(take.data)
        return True

    # ---- endings ----
    def _succeed(self) -> None:
        self._rx.trailer = self._trailer_bytes
        self._rx.status.mark_done()
        self._end()
        self._agent.reply(self.head.reply_address, self.layout.wire_id, pb.KVFrame(kind=pb.KV_FRAME_KIND_ACK))

    def _fail(self, reason: str, now_s: float) -> None:
        self._failure = reason
        self._stall_end_s = now_s + self._agent.stall_timeout_s
        self._finish_failure(now_s)

    def _discard(self, found) -> None:
        """Take a message this transfer will not use (wrong size) off UCX's queue."""
        self._scratch.append(self._agent.take(found, bytearray(found.length)))

    def _finish_failure(self, now_s: float) -> bool:
        """A failed transfer's destination goes back to the pool: no receive may still be writing
        into it when the failure is reported (up to the stall timeout). Nor is the sender answered
        while a receive still reads from it: told, it may exit, and UCX (without error handling)
        aborts this process when a read from a process that is gone fails."""
        trailer = [] if self._trailer is None else [self._trailer[0]]
        in_flight = (*self._takes, *self._scratch, *self._frames, *trailer, self._trailer_frame)
        if any(t is not None and not t.done for t in in_flight) and now_s < self._stall_end_s:
            return False
        self._rx.status.mark_failed(self._failure)     # keeps an earlier abort's reason
        self._end()
        if self.head is not None:
            if self.head.reply_address:
                self._agent.reply(self.head.reply_address, self.layout.wire_id,
                                  pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=self._rx.failure() or ""))
            # Only a sender whose header arrived can have messages on the data tags. A header
            # that comes after this receiver is gone meets the inbox, which refuses and drains it;
            # draining here as well cost every refused prefill (its reservation aborted before any
            # byte) two seconds of probing every tag, which under overload ate the core the pool
            # computes on.
            self._agent.drain(self.layout.wire_id, self.layout.num_layers)
        return True

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self._agent.armed.pop(self.layout.transfer_id, None)
            self._agent.track(-1)

