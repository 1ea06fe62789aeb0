"""The three coroutines of the UCX agent: inbox, send and receive (see ucx.py for the protocol)."""
from __future__ import annotations

import asyncio

import numpy as np

from pdserve.kvtransfer import frames
from pdserve.kvtransfer.backends._ucx_wire import (ABORT_SLOT, ACK_SLOT, IDLE_BACKOFF_S, INBOX_TAG,
                                                   Aborted, Pacer, frame_slot, tag)
from pdserve.kvtransfer.base import crc32, wire_id
from pdserve.v1 import kvtransfer_pb2 as pb


class UcxFlows:
    """Mixed into UcxAgent; every method runs on the agent's event loop thread."""

    async def _inbox_loop(self) -> None:
        """Route incoming headers to armed receivers; refuse unknown transfers at once."""
        pacer = Pacer(IDLE_BACKOFF_S)
        while True:
            found = self._probe(INBOX_TAG)
            if found is None:
                await self._inbox_pause(pacer)
                continue
            pacer.reset()
            try:
                head = await self._take_frame(found)
            except Exception:
                continue  # a malformed header names no transfer to answer
            waiter, layout = self._armed.get(head.transfer_id, (None, None))
            wire = wire_id(head.transfer_id, head.transfer_token)
            # A header without the transfer's token is refused before the receiver sees it, which
            # stays armed for the sender it was reserved for. A sender holding the token shares the
            # transfer's tags, so its bad header (wrong layout) fails the receive itself.
            if waiter is None or waiter.done():
                reason = f"unknown or expired transfer id {head.transfer_id}"
            elif (reason := frames.check_header(head, layout)) is None or wire == layout.wire_id:
                waiter.set_result(head)
                continue
            self._spawn(self._reply(head.reply_address, wire, pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=reason)))
            self._spawn(self._drain(wire, head.num_layers))

    async def _inbox_pause(self, pacer: Pacer) -> None:
        """Poll briskly while some receiver expects a header (it bounds time to first byte); with
        none armed only stray headers can come, so sleep long, but wake at once when one is armed."""
        if self._armed:
            await pacer.wait()
            return
        pacer.reset()
        self._inbox_wake.clear()
        try:
            await asyncio.wait_for(self._inbox_wake.wait(), IDLE_BACKOFF_S)
        except asyncio.TimeoutError:
            pass

    async def _send(self, tx, peer_address: bytes, checksum: bool) -> None:
        tid = tx.layout.wire_id   # labels the data tags
        ep = None
        try:
            ep = await self._bounded(self._endpoint(peer_address), tx.status)
            head = frames.header(tx.layout, checksum)
            head.reply_address = self._address
            await self._send_frame(ep, head, INBOX_TAG, tx.status)
            tx.status.mark_transferring()
            next_slot = frame_slot(0)
            while True:
                item = await self._bounded(tx.queue.get(), tx.status)
                await self._raise_if_refused(tid)
                if item[0] == "abort":
                    raise Aborted()
                if item[0] == "trailer":
                    await self._send_trailer(ep, tx, tag(tid, next_slot), item[1])
                    await self._await_ack(tx)
                    return
                _, index, buf, given_crc = item
                crc = (crc32(buf) if given_crc is None else given_crc) if checksum else 0
                frame = pb.KVFrame(kind=pb.KV_FRAME_KIND_LAYER, layer_index=index, payload_bytes=len(buf),
                                   crc32=crc)
                await self._send_frame(ep, frame, tag(tid, next_slot), tx.status)
                payload = np.frombuffer(buf, dtype=np.uint8)
                await self._bounded_io(ep.send(payload, tag=tag(tid, next_slot + 1), force_tag=True), payload,
                                       tx.status)
                next_slot += 2
        except (Aborted, asyncio.TimeoutError):
            tx.status.mark_failed("timed out")  # keeps an earlier abort's reason
        except Exception as exc:  # UCX errors surface as various exception types
            tx.status.mark_failed(str(exc) if isinstance(exc, _Refused) else f"ucx send failed: {exc}")
        finally:
            tx.queue = asyncio.Queue()  # drop references to caller buffers
            if ep is not None and tx.poll().name == "FAILED":
                await self._send_abort(ep, tid, tx.failure() or "failed")
            self._track(-1)

    async def _send_trailer(self, ep, tx, frame_tag: int, trailer: bytes) -> None:
        """The trailer's size in a control frame, then its bytes as a payload of their own (the
        next tag): with prompt logprobs it can be far larger than a control slot."""
        if len(trailer) > frames.MAX_TRAILER_BYTES:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        await self._send_frame(ep, pb.KVFrame(kind=pb.KV_FRAME_KIND_TRAILER, payload_bytes=len(trailer)),
                               frame_tag, tx.status)
        if trailer:
            payload = np.frombuffer(trailer, dtype=np.uint8)
            await self._bounded_io(ep.send(payload, tag=frame_tag + 1, force_tag=True), payload, tx.status)

    async def _raise_if_refused(self, wire_id: int) -> None:
        """An early ERROR from the receiver (bad header, unknown id) ends the send at once."""
        found = self._probe(tag(wire_id, ACK_SLOT))
        if found is not None:
            raise _Refused(f"receiver refused: {(await self._take_frame(found)).reason}")

    async def _await_ack(self, tx) -> None:
        pacer = Pacer()
        while (found := self._probe(tag(tx.layout.wire_id, ACK_SLOT))) is None:
            if not tx.status.active:
                raise Aborted()
            await pacer.wait()
        reply = await self._take_frame(found)
        if reply.kind == pb.KV_FRAME_KIND_ACK:
            tx.status.mark_done()
        else:
            tx.status.mark_failed(f"receiver refused: {reply.reason}")

    async def _send_abort(self, ep, wire_id: int, reason: str) -> None:
        try:
            await self._send_frame(ep, frames.abort_frame(reason), tag(wire_id, ABORT_SLOT), None)
        except Exception:  # best effort: the receiver's deadline covers a lost abort
            pass

    async def _receive(self, rx) -> None:
        layout = rx.layout
        tid, wire = layout.transfer_id, layout.wire_id
        waiter = asyncio.get_running_loop().create_future()
        self._armed[tid] = (waiter, layout)
        self._inbox_wake.set()
        head = None
        try:
            head = await self._bounded(waiter, rx.status)
            problem = frames.check_header(head, layout)
            if problem:
                raise ValueError(problem)
            rx.status.mark_transferring()
            await self._receive_layers(rx, head.checksum == pb.CHECKSUM_KIND_CRC32)
            rx.trailer = await self._receive_trailer(rx)
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
            if failed:
                self._spawn(self._drain(wire, layout.num_layers))

    async def _receive_layers(self, rx, checksum: bool) -> None:
        offset = 0
        for index in range(rx.layout.num_layers):
            frame = await self._take_frame(await self._wait_probe(rx, frame_slot(index)))
            problem = frames.check_layer(frame, index, rx.layout)
            if problem:
                raise ValueError(problem)
            view = rx.dest[offset: offset + frame.payload_bytes]
            found = await self._wait_probe(rx, frame_slot(index) + 1)
            if found.length != len(view):
                await self._take(found, bytearray(found.length))  # off UCX's queue, then refuse
                raise ValueError(f"KV payload of layer {index} is {found.length} bytes, expected {len(view)} "
                                 "(truncated or corrupted)")
            await self._take(found, view)
            if checksum and crc32(view) != frame.crc32:
                raise ValueError(f"checksum mismatch in layer {index}")
            offset += frame.payload_bytes
            rx.num_layers_received = index + 1

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

    async def _wait_probe(self, rx, slot: int):
        wanted, abort_tag = tag(rx.layout.wire_id, slot), tag(rx.layout.wire_id, ABORT_SLOT)
        pacer = Pacer()
        while True:
            if (found := self._probe(wanted)) is not None:
                return found
            if (aborted := self._probe(abort_tag)) is not None:
                raise ValueError(f"sender aborted: {(await self._take_frame(aborted)).reason}")
            if not rx.status.active:
                raise Aborted()
            await pacer.wait()


class _Refused(Exception):
    """The receiver answered ERROR before the transfer finished."""
