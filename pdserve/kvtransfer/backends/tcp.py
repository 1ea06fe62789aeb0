"""TCP fallback: one connection per transfer, blocking sockets on background threads.

Plain `sendall`/`recv_into` straight into the destination buffer (no intermediate copies);
asyncio streams were measured ~5x slower for bulk payloads. Receive side: an acceptor thread hands
each connection to a thread that reads the header, finds the armed receiver, and fills its buffer
layer by layer; any mismatch, checksum error, stall or EOF fails the transfer and is reported to
the sender with an ERROR frame when the socket still works.
"""
from __future__ import annotations

import queue
import socket
import threading

from pdserve.clock import Clock
from pdserve.kvtransfer import frames
from pdserve.kvtransfer.base import (BaseKVAgent, BaseKVReceiver, BaseKVSender, TransferLayout,
                                     TransferStatus, crc32)
from pdserve.v1 import kvtransfer_pb2 as pb

_SOCKET_BUFFER_BYTES = 4 << 20  # large kernel buffers keep multi-MiB layers streaming
_POLL_S = 0.05                  # how often idle threads re-check deadlines and aborts
_DRAIN_CHUNK_BYTES = 1 << 16   # read size while draining a refused transfer before closing


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {len(view)} bytes")
        got += n


def _read_frame(sock: socket.socket) -> pb.KVFrame:
    prefix = bytearray(4)
    _recv_exact(sock, memoryview(prefix))
    body = bytearray(frames.frame_length(bytes(prefix)))
    _recv_exact(sock, memoryview(body))
    return frames.decode(body)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)


class TcpReceiver(BaseKVReceiver):
    def __init__(self, agent: "TcpAgent", layout: TransferLayout, dest: memoryview, status: TransferStatus):
        super().__init__(layout, status)
        self._agent = agent
        self.dest = dest
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket) -> bool:
        if self._sock is not None or not self.status.active:
            return False
        self._sock = sock
        return True

    def abort(self, reason: str) -> None:
        # Only an abort that ends the transfer touches the socket: once the connection thread has
        # failed it (a bad layer, say), that thread is telling the sender why, and a shutdown here
        # would cut its ERROR frame off (the sender then saw only "peer closed the connection").
        ended_here = self.status.mark_failed(f"aborted: {reason}")
        sock = self._sock
        if ended_here and sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the connection thread at once
            except OSError:
                pass
        self._agent.forget_receiver(self.layout.transfer_id, self)


class TcpSender(BaseKVSender):
    def __init__(self, address: tuple[str, int], layout: TransferLayout, status: TransferStatus,
                 checksum: bool, on_end):
        super().__init__(layout, status)
        self._address = address
        self._checksum = checksum
        self._queue: queue.Queue = queue.Queue()
        self._on_end = on_end
        self._thread = threading.Thread(target=self._run, name="kv-tcp-send", daemon=True)
        self._thread.start()

    def send_layer(self, layer_index: int, buf: memoryview, crc32: int | None = None) -> None:
        self._queue.put(("layer", layer_index, buf, crc32))

    def finish(self, trailer: bytes) -> None:
        self._queue.put(("trailer", trailer))

    def abort(self, reason: str) -> None:
        if self.status.mark_failed(f"aborted: {reason}"):
            self._queue.put(("abort", reason))

    def _next_item(self):
        while self.status.active:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        try:
            return self._queue.get_nowait()  # an abort queued just before failing
        except queue.Empty:
            return None

    def _run(self) -> None:
        sock = None
        try:
            sock = socket.create_connection(self._address, timeout=max(0.1, self._remaining_s()))
            _tune(sock)
            sock.sendall(frames.encode_stream(frames.header(self.layout, self._checksum)))
            self.status.mark_transferring()
            self._pump(sock)
        except (OSError, ValueError) as exc:
            self.status.mark_failed(self._peer_reason(sock) or f"tcp send failed: {exc}")
        finally:
            if sock is not None:
                sock.close()
            self._queue = queue.Queue()  # drop references to caller buffers
            self._on_end(self)

    def _pump(self, sock: socket.socket) -> None:
        while (item := self._next_item()) is not None:
            if item[0] == "abort":
                sock.sendall(frames.encode_stream(frames.abort_frame(item[1])))
                return
            if item[0] == "layer":
                _, index, buf, given_crc = item
                checksum = (crc32(buf) if given_crc is None else given_crc) if self._checksum else 0
                frame = pb.KVFrame(kind=pb.KV_FRAME_KIND_LAYER, layer_index=index,
                                   payload_bytes=len(buf), crc32=checksum)
                sock.sendall(frames.encode_stream(frame))
                sock.sendall(buf)
                continue
            sock.sendall(frames.encode_stream(pb.KVFrame(kind=pb.KV_FRAME_KIND_TRAILER, trailer=item[1])))
            sock.settimeout(max(0.1, self._remaining_s()))
            reply = _read_frame(sock)
            if reply.kind == pb.KV_FRAME_KIND_ACK:
                self.status.mark_done()
            else:
                self.status.mark_failed(f"receiver refused: {reply.reason}")
            return

    def _peer_reason(self, sock: socket.socket | None) -> str | None:
        """After a broken send, the receiver may have left an ERROR frame saying why."""
        if sock is None:
            return None
        try:
            sock.settimeout(0.2)
            reply = _read_frame(sock)
            return f"receiver refused: {reply.reason}" if reply.kind == pb.KV_FRAME_KIND_ERROR else None
        except (OSError, ValueError):
            return None

    def _remaining_s(self) -> float:
        return self.status.remaining_s()


class TcpAgent(BaseKVAgent):
    backend_name = "tcp"

    def __init__(self, clock: Clock, host: str, port: int = 0, stall_timeout_s: float = 10.0):
        self._clock = clock
        self._stall_timeout_s = stall_timeout_s
        self._lock = threading.Lock()
        self._receivers: dict[int, TcpReceiver] = {}
        self._senders: set[TcpSender] = set()
        self._listener = socket.create_server((host, port), backlog=128)
        self._closed = False
        self._address = f"{host}:{self._listener.getsockname()[1]}".encode()
        threading.Thread(target=self._accept_loop, name="kv-tcp-accept", daemon=True).start()

    def address(self) -> bytes:
        return self._address

    def create_receiver(self, layout: TransferLayout, dest: memoryview, timeout_s: float) -> TcpReceiver:
        if len(dest) != layout.total_nbytes:
            raise ValueError(f"destination holds {len(dest)} bytes, layout needs {layout.total_nbytes}")
        rx = TcpReceiver(self, layout, dest, TransferStatus(self._clock, timeout_s))
        with self._lock:
            if layout.transfer_id in self._receivers:
                raise ValueError(f"transfer {layout.transfer_id} already has a receiver")
            self._receivers[layout.transfer_id] = rx
        return rx

    def check_peer_address(self, peer_address: bytes) -> str | None:
        host, _, port = peer_address.decode(errors="replace").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"bad tcp KV address {peer_address[:80]!r}, expected b'host:port'"
        return None

    def create_sender(self, peer_address: bytes, layout: TransferLayout, timeout_s: float,
                      checksum: bool = False) -> TcpSender:
        if problem := self.check_peer_address(peer_address):
            raise ValueError(problem)
        host, _, port = peer_address.decode().rpartition(":")
        status = TransferStatus(self._clock, timeout_s)
        with self._lock:
            tx = TcpSender((host, int(port)), layout, status, checksum, self._forget_sender)
            self._senders.add(tx)
        return tx

    def forget_receiver(self, transfer_id: int, rx: TcpReceiver) -> None:
        with self._lock:
            if self._receivers.get(transfer_id) is rx:
                del self._receivers[transfer_id]

    def _forget_sender(self, tx: TcpSender) -> None:
        with self._lock:
            self._senders.discard(tx)

    def num_active_transfers(self) -> int:
        with self._lock:
            expired = [(t, rx) for t, rx in self._receivers.items() if not rx.status.active]
        for transfer_id, rx in expired:
            rx.abort("expired")
        with self._lock:
            return len(self._receivers) + len(self._senders)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            receivers, senders = list(self._receivers.values()), list(self._senders)
        for rx in receivers:
            rx.abort("agent closed")
        for tx in senders:
            tx.abort("agent closed")

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="kv-tcp-recv", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        rx = None
        try:
            _tune(sock)
            sock.settimeout(self._stall_timeout_s)
            head = _read_frame(sock)
            with self._lock:
                armed = self._receivers.get(head.transfer_id)
            # Checked before attaching: a connection whose header does not fit is refused and the
            # armed receiver stays open for the sender it was reserved for.
            problem = "unknown or expired transfer id" if armed is None else frames.check_header(head, armed.layout)
            if problem:
                raise LookupError(f"{problem} ({head.transfer_id})")
            if not armed.attach(sock):
                raise LookupError(f"transfer {head.transfer_id} already has a sender")
            rx = armed
            rx.status.mark_transferring()
            self._receive_layers(sock, rx, head.checksum == pb.CHECKSUM_KIND_CRC32)
            sock.sendall(frames.encode_stream(pb.KVFrame(kind=pb.KV_FRAME_KIND_ACK)))
        except (OSError, ValueError, LookupError, ConnectionError) as exc:
            reason = f"tcp receive failed: {exc}"
            if rx is not None:
                rx.status.mark_failed(reason)
            self._refuse(sock, reason)
        finally:
            sock.close()
            if rx is not None:
                self.forget_receiver(rx.layout.transfer_id, rx)

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Send ERROR, then close gracefully: half-close and drain what the sender still sends.
        Closing with unread bytes would reset the connection, and a reset can destroy the ERROR
        frame before the sender reads it (it would then only see "peer closed the connection")."""
        try:
            sock.sendall(frames.encode_stream(pb.KVFrame(kind=pb.KV_FRAME_KIND_ERROR, reason=reason)))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(self._stall_timeout_s)      # bounded: a silent sender cannot hold us
            while sock.recv(_DRAIN_CHUNK_BYTES):
                pass
        except OSError:
            pass

    def _receive_layers(self, sock: socket.socket, rx: TcpReceiver, checksum: bool) -> None:
        offset = 0
        for index in range(rx.layout.num_layers):
            frame = _read_frame(sock)
            problem = frames.check_layer(frame, index, rx.layout)
            if problem:
                raise ValueError(problem)
            view = rx.dest[offset: offset + frame.payload_bytes]
            _recv_exact(sock, view)
            if checksum and crc32(view) != frame.crc32:
                raise ValueError(f"checksum mismatch in layer {index}")
            offset += frame.payload_bytes
            rx.num_layers_received = index + 1
        tail = _read_frame(sock)
        if tail.kind != pb.KV_FRAME_KIND_TRAILER:
            raise ValueError(frames.check_layer(tail, rx.layout.num_layers, rx.layout) or "expected trailer")
        rx.trailer = tail.trailer
        if not rx.status.mark_done():
            raise ValueError(rx.status.failure() or "transfer ended early")
