"""gRPC channel and server settings shared by every component.

Keepalive pings find a peer that died without closing its socket (power loss, a partition, a
SIGSTOPped process) within about `_KEEPALIVE_TIME_MS + _KEEPALIVE_TIMEOUT_MS` instead of the
kernel's TCP timeout of minutes; servers must accept pings that often or they close the
connection with "too_many_pings". Reconnect backoff is capped low so a restarted router or worker
is reachable again within half a second, rather than after gRPC's default backoff of up to 120 s.
"""
from __future__ import annotations

import grpc

from pdserve import cluster_auth

MAX_MESSAGE_BYTES = 64 << 20
_KEEPALIVE_TIME_MS = 10_000
_KEEPALIVE_TIMEOUT_MS = 5_000
_MAX_RECONNECT_BACKOFF_MS = 500

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
)

_SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", _KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)


def channel(address: str, cluster_secret: str = "") -> grpc.aio.Channel:
    """`cluster_secret`: carried by every call (what Router and Worker servers require)."""
    channel = grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))
    return cluster_auth.SecretChannel(channel, cluster_secret) if cluster_secret else channel


def server(max_concurrent_rpcs: int | None, cluster_secret: str = "") -> grpc.aio.Server:
    """Calls beyond `max_concurrent_rpcs` are refused at once with RESOURCE_EXHAUSTED; with a
    `cluster_secret`, Router and Worker calls without it are refused with UNAUTHENTICATED."""
    interceptors = [cluster_auth.RequireSecret(cluster_secret)] if cluster_secret else None
    return grpc.aio.server(options=list(_SERVER_OPTIONS), maximum_concurrent_rpcs=max_concurrent_rpcs,
                           interceptors=interceptors)
