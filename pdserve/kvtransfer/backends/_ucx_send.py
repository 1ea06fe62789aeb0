"""The sending side of a UCX transfer (see ucx.py for the protocol).

The caller's thread posts each layer's sends itself, the moment it hands the layer over: ucxx
makes its workers thread-safe (UCS_THREAD_MODE_MULTI), so the data need not wait for the engine's
thread to wake and take it (a hand-off that cost 40-70 us a transfer on a 2-vCPU host). The
engine's thread steps the flow for the rest: completions, the receiver's answer, the deadline,
an abort. The engine's lock keeps the two threads' turns apart (and their UCX calls).
"""
from __future__ import annotations

import numpy as np

from pdserve.kvtransfer import frames
from pdserve.kvtransfer.backends._ucx_engine import Pending
from pdserve.kvtransfer.backends._ucx_wire import (ACK_SLOT, ABORT_SLOT, INBOX_TAG, Aborted, Flow, frame_slot,
                                                   tag)
from pdserve.kvtransfer.base import crc32
from pdserve.v1 import kvtransfer_pb2 as pb


class Refused(Exception):
    """The receiver answered ERROR (or answered before it had everything)."""


class SendFlow(Flow):
    """Sends are posted back to back as the caller hands layers over, and the transfer is DONE
    once all of them completed and the receiver acknowledged: the next layer need not wait for
    the previous one's receiver. Each buffer is kept until UCX sent it.

    The header goes out after the first layer, not before it: each message that finds its
    receiver asleep wakes it (50-100 us of scheduling on a small VM), and a header sent first
    woke it once for the header and again for the data; the receiver takes data that comes
    before its header."""

    def __init__(self, agent, tx, peer_address: bytes, checksum: bool):
        """Caller's thread."""
        self._agent, self._tx, self._checksum = agent, tx, checksum
        self._lock = agent.engine.lock          # held by the engine while it steps this flow
        self._ep = self._head = None
        self._error: Exception | None = None     # from a post on the caller's thread
        self._aborted = self._closed_for_posts = False
        self._header_posted = self._trailer_posted = self._acked = False
        self._next_slot = frame_slot(0)
        self._sends: list[Pending] = []
        self._reply: Pending | None = None       # the take of the receiver's ACK or ERROR
        try:
            with self._lock:
                self._ep = agent.endpoint(peer_address)
            self._head = self._header_frame()
            tx.status.mark_transferring()
        except Exception as exc:  # reported as the transfer's failure by the engine's thread
            self._error = exc

    def _header_frame(self) -> pb.KVFrame:
        head = frames.header(self._tx.layout, self._checksum)
        head.reply_address = self._agent.address()
        # Without a checksum a layer's frame says nothing its tag and probed length do not:
        # leaving it out halves the messages (and the receiver's probes) of a transfer.
        head.frameless = self._agent.frameless_sends and not self._checksum
        return head

    # ---- the caller's thread ----
    def send_layer(self, index: int, buf, given_crc: int | None) -> None:
        self._posting(self._post_layer, index, buf, given_crc)

    def finish(self, trailer: bytes) -> None:
        self._posting(self._post_trailer, trailer)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
        self._agent.engine.wake()

    def _posting(self, post, *args) -> None:
        with self._lock:
            if self._closed_for_posts or self._error is not None or self._trailer_posted:
                return
            try:
                post(*args)
                self._post_header_once()
            except Exception as exc:  # UCX errors surface as various exception types
                self._error = exc
        # The engine's thread progresses the sends and hears the receiver's answer.
        self._agent.engine.wake()

    def _post_layer(self, index: int, buf, given_crc: int | None) -> None:
        frame_tag = tag(self._tx.layout.wire_id, self._next_slot)
        if not self._head.frameless:
            crc = (crc32(buf) if given_crc is None else given_crc) if self._checksum else 0
            self._send(frames.encode_slot(pb.KVFrame(kind=pb.KV_FRAME_KIND_LAYER, layer_index=index,
                                                     payload_bytes=len(buf), crc32=crc)), frame_tag)
        self._send(np.frombuffer(buf, dtype=np.uint8), frame_tag + 1)
        self._next_slot += 2

    def _post_trailer(self, trailer: bytes) -> None:
        """The trailer's bytes as a payload of their own (the next tag; with prompt logprobs it can
        be far larger than a control slot), after a control frame with their size unless frameless."""
        if len(trailer) > frames.MAX_TRAILER_BYTES:
            raise ValueError(f"trailer of {len(trailer)} bytes exceeds {frames.MAX_TRAILER_BYTES}")
        frame_tag = tag(self._tx.layout.wire_id, self._next_slot)
        if not self._head.frameless:
            self._send(frames.encode_slot(pb.KVFrame(kind=pb.KV_FRAME_KIND_TRAILER,
                                                     payload_bytes=len(trailer))), frame_tag)
        if trailer or self._head.frameless:
            self._send(np.frombuffer(trailer, dtype=np.uint8), frame_tag + 1)
        self._trailer_posted = True

    def _post_header_once(self) -> None:
        if not self._header_posted:
            self._send(frames.encode_slot(self._head), INBOX_TAG)
            self._header_posted = True

    def _send(self, buf, buf_tag: int) -> None:
        self._sends.append(self._agent.post_send(self._ep, buf, buf_tag))

    # ---- the engine's thread ----
    def wake_at_s(self) -> float:
        return self._tx.status.remaining_s()

    def step(self, now_s: float) -> bool:
        tx = self._tx
        try:
            if self._error is not None:
                raise self._error
            if self._aborted:
                raise Aborted()
            moved = self._check_sends() | self._check_reply()
            if self._acked and not self._sends:
                tx.status.mark_done()
                self._end()
                return True
            if not tx.status.active or tx.status.remaining_s() <= 0:
                raise Aborted()
            return moved
        except Aborted:
            self._fail("timed out")     # keeps an earlier abort's reason
        except Refused as exc:
            self._fail(str(exc))
        except Exception as exc:  # UCX errors surface as various exception types
            self._fail(f"ucx send failed: {exc}")
        return True

    def close(self) -> None:
        self._tx.status.mark_failed("ucx agent closed")
        self._end()

    def _check_sends(self) -> bool:
        """Drops completed sends; raises the error of a failed one (the transfer fails now, not
        at its end)."""
        still = [s for s in self._sends if not s.poll()]
        if len(still) == len(self._sends):
            return False
        for send in self._sends:
            if send.error is not None:
                raise send.error
        self._sends = still
        return True

    def _check_reply(self) -> bool:
        """An ERROR from the receiver ends the send at once (bad header, unknown id); its ACK,
        once the trailer is out, ends it well."""
        if self._acked:
            return False
        if self._reply is None:
            self._reply = self._agent.take_if_arrived(tag(self._tx.layout.wire_id, ACK_SLOT))
            return self._reply is not None
        if not self._reply.done:
            return False
        reply = self._agent.frame_of(self._reply)
        if reply.kind != pb.KV_FRAME_KIND_ACK or not self._trailer_posted:
            raise Refused(f"receiver refused: {reply.reason}")
        self._acked = True
        return True

    def _fail(self, reason: str) -> None:
        """Under the lock."""
        tx = self._tx
        tx.status.mark_failed(reason)
        if self._head is not None and tx.poll().name == "FAILED":
            # The receiver looks for an abort only after the header, and then drains what this
            # sender posted; without the header, the data would wait in its UCX queue for good.
            try:
                self._post_header_once()
                self._send(frames.encode_slot(frames.abort_frame(tx.failure() or "failed")),
                           tag(tx.layout.wire_id, ABORT_SLOT))
            except Exception:  # best effort: the receiver's deadline covers a lost abort
                pass
        self._end()

    def _end(self) -> None:
        """Under the lock. Requests still in flight go to the engine, which keeps their buffers;
        this flow lets go of every request here, on the engine's thread: the caller's thread may
        drop the flow last, and ucxx must not free a request there while the engine progresses."""
        if not self.finished:
            self.finished = self._closed_for_posts = True
            for pending in (*self._sends, *([self._reply] if self._reply is not None else [])):
                self._agent.engine.adopt(pending)
            self._sends, self._reply = [], None
            self._agent.track(-1)
