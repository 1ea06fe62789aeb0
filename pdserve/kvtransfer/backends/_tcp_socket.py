"""Blocking-socket helpers of the tcp backend: exact reads, frames, socket tuning."""
from __future__ import annotations

import socket

from pdserve.kvtransfer import frames
from pdserve.v1 import kvtransfer_pb2 as pb

_SOCKET_BUFFER_BYTES = 4 << 20  # large kernel buffers keep multi-MiB layers streaming
_KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))   # seconds, seconds, probes


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {len(view)} bytes")
        got += n


def read_frame(sock: socket.socket) -> pb.KVFrame:
    prefix = bytearray(4)
    recv_exact(sock, memoryview(prefix))
    return read_body(sock, prefix)


def read_body(sock: socket.socket, prefix: bytearray) -> pb.KVFrame:
    body = bytearray(frames.frame_length(bytes(prefix)))
    recv_exact(sock, memoryview(body))
    return frames.decode(body)


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
    # Connections stay open between transfers: keepalive notices a peer host that vanished
    # without closing them, so a receiving thread does not wait on it forever.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE:
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def peer_reason(sock: socket.socket) -> str | None:
    """After a broken send, the receiver may have left an ERROR frame saying why."""
    try:
        sock.settimeout(0.2)
        reply = read_frame(sock)
        return f"receiver refused: {reply.reason}" if reply.kind == pb.KV_FRAME_KIND_ERROR else None
    except (OSError, ValueError):
        return None
