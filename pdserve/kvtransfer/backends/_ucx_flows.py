"""The three coroutines of the UCX agent: inbox, send and receive (see ucx.py for the protocol)."""
from __future__ import annotations

import asyncio

import numpy as np

from pdserve.kvtransfer import frames
from pdserve.kvtransfer.backends._ucx_wire import (ABORT_POLL_S, ABORT_SLOT, ACK_SLOT, INBOX_TAG, Aborted,
                                                   frame_slot, tag, ucx_buffer, ucx_tag, wait_active)
from pdserve.kvtransfer.base import crc32, wire_id
from pdserve.v1 import kvtransfer_pb2 as pb


class UcxFlows:
    """Mixed into UcxAgent; every method runs on the agent's event loop thread."""

    async def _inbox_loop(self) -> None:
        """Route incoming headers to armed receivers; refuse unknown transfers at once.

        The inbox keeps one receive posted (pre-posted, not probed): a header lands in it as it
        arrives, and the progress on the loop completes it without a probe-then-receive round
        trip. Its buffer belongs to the agent, so the receive may stay posted for the agent's
        lifetime."""
        while True:
            request = self._worker.tag_recv(ucx_buffer(self._inbox_buf), ucx_tag(INBOX_TAG))
            try:
                await self._progress.wait(request, self._inbox_buf)
                head = frames.decode_slot(bytes(self._inbox_buf))
            except asyncio.CancelledError:
                raise
            except Exception:
                head = None               # truncated or malformed: it names no transfer to answer
            if head is not None:
                self._route_header(head)

    def _route_header(self, head: pb.KVFrame) -> None:
        waiter, layout = self._armed.get(head.transfer_id, (None, None))
        wire = wire_id(head.transfer_id, head.transfer_token)
        # A header without the transfer's token is refused before the receiver sees it, which
        # stays armed for the sender it was reserved for. A sender holding the token shares the
        # transfer's tags, so its bad header (wrong layout) fails the receive itself.
        if waiter is None or waiter.done():
            reason = f"unknown or expired transfer id {head.transfer_id}"
        elif (reason := frames.check_header(head, layout)) is None or wire == layout.wire_id:
            waiter.set_result(head)
            return
        self._spawn(self._reply(head.reply_address, wire, pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=reason)))
        self._spawn(self._drain(wire, head.num_layers))

    async def _send(self, tx, peer_address: bytes, checksum: bool) -> None:
        """Sends are posted back to back and awaited together before the ACK: the next layer
        need not wait for the previous one's receiver. Each buffer is kept until UCX sent it.

        The header goes out after the layers queued when the sender starts, not before them: each
        message that finds its receiver asleep wakes it (50-100 us of scheduling on a small VM),
        and a header sent first woke it once for the header and again for the data. The
        receiver routes data that came before its header like any other (UCX queues it)."""
        tid = tx.layout.wire_id   # labels the data tags
        ep = header = None
        posted = _Posted(self._progress)
        try:
            # Created even for a sender aborted already (it takes no wait): its receiver is told.
            ep = await self._endpoint(peer_address)
            header = _Header(ep, self._header_frame(tx.layout, checksum))
            tx.status.mark_transferring()
            next_slot = frame_slot(0)
            while True:
                item = await self._next_item(tx)
                posted.raise_failed()
                await self._raise_if_refused(tid)
                if item[0] == "abort":
                    raise Aborted()
                if item[0] == "trailer":
                    self._post_trailer(ep, posted, tag(tid, next_slot), item[1], header.frame.frameless)
                    header.post_once(posted)
                    await posted.settle(tx.status)
                    await self._await_ack(tx)
                    return
                self._post_layer(ep, posted, tag(tid, next_slot), item, header.frame, checksum)
                next_slot += 2
                if not tx.items:
                    header.post_once(posted)
        except (Aborted, asyncio.TimeoutError):
            tx.status.mark_failed("timed out")  # keeps an earlier abort's reason
        except Exception as exc:  # UCX errors surface as various exception types
            tx.status.mark_failed(str(exc) if isinstance(exc, _Refused) else f"ucx send failed: {exc}")
        finally:
            posted.abandon()
            tx.items.clear()  # drop references to caller buffers
            if header is not None and tx.poll().name == "FAILED":
                await self._send_abort(ep, tid, tx.failure() or "failed",
                                       None if header.posted else header.frame)
            self._track(-1)

    def _header_frame(self, layout, checksum: bool) -> pb.KVFrame:
        head = frames.header(layout, checksum)
        head.reply_address = self._address
        # Without a checksum a layer's frame says nothing its tag and probed length do not:
        # leaving it out halves the messages (and the receiver's probes) of a transfer.
        head.frameless = self.frameless_sends and not checksum
        return head

    @staticmethod
    def _post_layer(ep, posted: "_Posted", frame_tag: int, item, head: pb.KVFrame, checksum: bool) -> None:
        _, index, buf, given_crc = item
        if not head.frameless:
            crc = (crc32(buf) if given_crc is None else given_crc) if checksum else 0
            posted.frame(ep, pb.KVFrame(kind=pb.KV_FRAME_KIND_LAYER, layer_index=index,
                                        payload_bytes=len(buf), crc32=crc), frame_tag)
        posted.payload(ep, np.frombuffer(buf, dtype=np.uint8), frame_tag + 1)

    async def _next_item(self, tx):
        """The sender's next queued item; waits (within the deadline) only when none is queued."""
        while not tx.items:
            tx.waiter = self._loop.create_future()
            try:
                if not tx.items:        # re-read after publishing the waiter (see UcxSender._put)
                    await self._bounded(tx.waiter, tx.status)
            finally:
                tx.waiter = None
        return tx.items.popleft()

    @staticmethod
    def _post_trailer(ep, posted: "_Posted", frame_tag: int, trailer: bytes, frameless: bool) -> None:
        """The trailer's bytes as a payload of their own (the next tag; with prompt logprobs it can
        be far larger than a control slot), after a control frame with their size unless frameless."""
        if len(trailer) > frames.MAX_TRAILER_BYTES:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        if not frameless:
            posted.frame(ep, pb.KVFrame(kind=pb.KV_FRAME_KIND_TRAILER, payload_bytes=len(trailer)), frame_tag)
        if trailer or frameless:
            posted.payload(ep, np.frombuffer(trailer, dtype=np.uint8), frame_tag + 1)

    async def _raise_if_refused(self, wire_id: int) -> None:
        """An early ERROR from the receiver (bad header, unknown id) ends the send at once."""
        found = self._probe(tag(wire_id, ACK_SLOT))
        if found is not None:
            raise _Refused(f"receiver refused: {(await self._take_frame(found)).reason}")

    async def _await_ack(self, tx) -> None:
        while (found := self._probe(tag(tx.layout.wire_id, ACK_SLOT))) is None:
            if not tx.status.active:
                raise Aborted()
            await self._progress.next_event(ABORT_POLL_S)
        reply = await self._take_frame(found)
        if reply.kind == pb.KV_FRAME_KIND_ACK:
            tx.status.mark_done()
        else:
            tx.status.mark_failed(f"receiver refused: {reply.reason}")

    async def _send_abort(self, ep, wire_id: int, reason: str, header: pb.KVFrame | None) -> None:
        """`header`: the transfer's, when it has not gone out yet. The receiver looks for an abort
        only after the header, and then drains what this sender posted; without the header, the
        data would wait in the receiver's UCX queue for good."""
        try:
            if header is not None:
                await self._send_frame(ep, header, INBOX_TAG, None)
            await self._send_frame(ep, frames.abort_frame(reason), tag(wire_id, ABORT_SLOT), None)
        except Exception:  # best effort: the receiver's deadline covers a lost abort
            pass

    async def _receive(self, rx, waiter: asyncio.Future) -> None:
        layout = rx.layout
        tid, wire = layout.transfer_id, layout.wire_id
        head = None
        try:
            head = await self._bounded(waiter, rx.status)
            checksum = head.checksum == pb.CHECKSUM_KIND_CRC32
            problem = frames.check_header(head, layout) or (
                "a frameless transfer cannot carry checksums" if head.frameless and checksum else None)
            if problem:
                raise ValueError(problem)
            rx.status.mark_transferring()
            await self._receive_layers(rx, checksum, head.frameless)
            rx.trailer = await (self._receive_bare_trailer(rx) if head.frameless else self._receive_trailer(rx))
            rx.status.mark_done()
        except (Aborted, asyncio.TimeoutError):
            rx.status.mark_failed("timed out")
        except Exception as exc:
            rx.status.mark_failed(f"ucx receive failed: {exc}")
        finally:
            self._armed.pop(tid, None)
            self._track(-1)
            failed = rx.poll().name == "FAILED"
            if head is not None and head.reply_address:
                reply = (pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=rx.failure() or "")
                         if failed else pb.KVFrame(kind=pb.KV_FRAME_KIND_ACK))
                self._spawn(self._reply(head.reply_address, wire, reply))
            if failed and head is not None:
                # Only a sender whose header arrived can have messages on the data tags. A header
                # that comes after this receiver is gone meets the inbox, which refuses and drains
                # it; draining here as well cost every refused prefill (its reservation aborted
                # before any byte) two seconds of probing every tag, which under overload ate the
                # core the pool computes on.
                self._spawn(self._drain(wire, layout.num_layers))

    async def _receive_layers(self, rx, checksum: bool, frameless: bool) -> None:
        """Each layer (its frame, unless frameless, and its payload) is received into place once it
        has arrived, without waiting for the previous layer's receives to complete: consecutive
        layers' rendezvous reads overlap. Waiting for each layer before probing the next cost about
        0.1 ms a layer here, 4 ms for 30 layers of 1 MiB in all. Frames are checked in order once
        all completed."""
        posted: list[tuple[bytearray | None, memoryview]] = []
        takes: list[asyncio.Future] = []
        try:
            offset = 0
            for index in range(rx.layout.num_layers):
                frame_found, found = await self._probe_layer(rx, index, frameless)
                nbytes = rx.layout.layer_nbytes[index]
                frame_buf = None if frame_found is None else bytearray(frame_found.length)
                view = rx.dest[offset: offset + nbytes]
                posted.append((frame_buf, view))
                if frame_buf is not None:
                    takes.append(self._post_take(frame_found, frame_buf))
                takes.append(self._post_take(found, view))
                offset += nbytes
            # One wait for all of them: a wait per layer cost as much as a layer's receives.
            await wait_active(asyncio.gather(*takes), self._stall_timeout_s)
            for index, (frame_buf, view) in enumerate(posted):
                frame = None if frame_buf is None else frames.decode_slot(frame_buf)
                if frame is not None and (problem := frames.check_layer(frame, index, rx.layout)):
                    raise ValueError(problem)
                if checksum and crc32(view) != frame.crc32:
                    raise ValueError(f"checksum mismatch in layer {index}")
                rx.num_layers_received = index + 1
        except Exception:
            # A failed transfer's destination goes back to the pool: no receive may still be
            # writing into it when the failure is reported.
            if pending := [f for f in takes if not f.done()]:
                await asyncio.wait(pending, timeout=self._stall_timeout_s)
            raise

    async def _probe_layer(self, rx, index: int, frameless: bool):
        """The layer's frame (None when frameless) and payload, both arrived and of the layout's
        sizes (refused otherwise, after taking them off UCX's queue)."""
        frame_found = None if frameless else await self._wait_probe(rx, frame_slot(index))
        found = await self._wait_probe(rx, frame_slot(index) + 1)
        nbytes = rx.layout.layer_nbytes[index]
        bad_frame = frame_found is not None and frame_found.length != frames.SLOT_BYTES
        if found.length != nbytes or bad_frame:
            await asyncio.gather(*(self._take(f, bytearray(f.length)) for f in (frame_found, found) if f is not None))
            raise ValueError(f"KV payload of layer {index} is {found.length} bytes, expected {nbytes} "
                             "(truncated or corrupted)" if found.length != nbytes else
                             f"malformed control frame of {frame_found.length} bytes")
        return frame_found, found

    async def _receive_trailer(self, rx) -> bytes:
        layout = rx.layout
        tail = await self._take_frame(await self._wait_probe(rx, frame_slot(layout.num_layers)))
        if tail.kind != pb.KV_FRAME_KIND_TRAILER:
            raise ValueError(frames.check_layer(tail, layout.num_layers, layout) or "expected trailer")
        if tail.payload_bytes > frames.MAX_TRAILER_BYTES:
            raise ValueError(f"trailer of {tail.payload_bytes} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        if not tail.payload_bytes:
            return b""
        found = await self._wait_probe(rx, frame_slot(layout.num_layers) + 1)
        buf = bytearray(found.length)
        await self._take(found, buf)
        if found.length != tail.payload_bytes:
            raise ValueError(f"trailer is {found.length} bytes, its frame says {tail.payload_bytes}")
        return bytes(buf)

    async def _receive_bare_trailer(self, rx) -> bytes:
        """A frameless transfer's trailer: its bytes alone, their size from the probe."""
        found = await self._wait_probe(rx, frame_slot(rx.layout.num_layers) + 1)
        if found.length > frames.MAX_TRAILER_BYTES:
            await self._take(found, bytearray(found.length))
            raise ValueError(f"trailer of {found.length} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        buf = bytearray(found.length)
        await self._take(found, buf)
        return bytes(buf)

    async def _wait_probe(self, rx, slot: int):
        wanted, abort_tag = tag(rx.layout.wire_id, slot), tag(rx.layout.wire_id, ABORT_SLOT)
        while True:
            if (found := self._probe(wanted)) is not None:
                return found
            if (aborted := self._probe(abort_tag)) is not None:
                raise ValueError(f"sender aborted: {(await self._take_frame(aborted)).reason}")
            if not rx.status.active:
                raise Aborted()
            await self._progress.next_event(ABORT_POLL_S)


class _Refused(Exception):
    """The receiver answered ERROR before the transfer finished."""


class _Header:
    """A transfer's header, posted to the peer's inbox once."""

    def __init__(self, ep, frame: pb.KVFrame):
        self.ep, self.frame, self.posted = ep, frame, False

    def post_once(self, posted: "_Posted") -> None:
        if not self.posted:
            posted.frame(self.ep, self.frame, INBOX_TAG)
            self.posted = True


class _Posted:
    """UCX sends of one transfer in flight (the progress keeps their buffers)."""

    def __init__(self, progress):
        self._progress = progress
        self._sends: list[asyncio.Future] = []

    def frame(self, ep, frame: pb.KVFrame, frame_tag: int) -> None:
        self.payload(ep, frames.encode_slot(frame), frame_tag)

    def payload(self, ep, buf, buf_tag: int) -> None:
        array = ucx_buffer(buf)
        self._sends.append(self._progress.wait(ep.tag_send(array, ucx_tag(buf_tag)), array))

    def raise_failed(self) -> None:
        """Drops completed sends; raises the error of a failed one (the transfer fails now, not
        at its end)."""
        for send in self._sends:
            if send.done() and send.exception() is not None:
                raise send.exception()
        self._sends = [send for send in self._sends if not send.done()]

    async def settle(self, status) -> None:
        """Every send completed within the transfer's deadline, or Aborted / the send's error."""
        while self._sends:
            if status.remaining_s() <= 0 or not status.active:
                raise Aborted()     # an abort must not wait for sends its peer will never take
            await asyncio.wait(self._sends, timeout=min(status.remaining_s(), ABORT_POLL_S))
            self.raise_failed()

    def abandon(self) -> None:
        self._sends = []
