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


def channel(address: str, credential: cluster_auth.Credential | None = None) -> grpc.aio.Channel:
    """`credential`: the cluster secret every call carries and/or the mutual TLS material (what
    Router and Worker servers require)."""
    cred = cluster_auth.as_credential(credential)
    options = list(CHANNEL_OPTIONS)
    if cred.tls is None:
        ch = grpc.aio.insecure_channel(address, options=options)
    else:
        if cred.tls.server_name:
            options.append(("grpc.ssl_target_name_override", cred.tls.server_name))
        ch = grpc.aio.secure_channel(address, cred.tls.channel_credentials(), options=options)
    return cluster_auth.SecretChannel(ch, cred.secret) if cred.secret else ch


def server(max_concurrent_rpcs: int | None, credential: cluster_auth.Credential | None = None) -> grpc.aio.Server:
    """Calls beyond `max_concurrent_rpcs` are refused at once with RESOURCE_EXHAUSTED; with a
    cluster secret, Router and Worker calls without it are refused with UNAUTHENTICATED; a
    malformed request message gets INVALID_ARGUMENT. Bind it with `listen()`, which adds mutual
    TLS when the credential has it."""
    secret = cluster_auth.as_credential(credential).secret
    # Credential first: bytes of a caller without it are never parsed.
    interceptors = [cluster_auth.RequireSecret(secret)] if secret else []
    interceptors.append(cluster_auth.ParseRequests())
    return grpc.aio.server(options=list(_SERVER_OPTIONS), maximum_concurrent_rpcs=max_concurrent_rpcs,
                           interceptors=interceptors)


def listen(server: grpc.aio.Server, address: str, credential: cluster_auth.Credential | None = None) -> int:
    """Bind `address` (TLS requiring a client certificate from the cluster CA when configured);
    returns the port."""
    tls = cluster_auth.as_credential(credential).tls
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())
