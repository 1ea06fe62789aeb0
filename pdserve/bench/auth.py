"""`pdserve bench auth`: what the cluster credential costs per gRPC call.

In-process Router servers on loopback: `bare` is a grpc.aio server with no interceptors (the
baseline); `plain` is pdserve's server without a credential (its request-parsing interceptor
only); `secret` requires the cluster secret, called through `pdserve.rpc.channel` (the channel's
method factories add the metadata) and, as `secret_by_interceptor`, through a grpc.aio client
interceptor adding the same metadata (the textbook way); `mtls_and_secret` adds mutual TLS with
development certificates. Calls: a unary call (ListWorkers, an empty registry) and a one-chunk
stream (Generate), as the gateway and router make them. Rounds alternate between the modes so that
drift on a shared machine hits all alike; reported: p50 and p99 per call and each mode's p50 ratio
to `bare`. Connections are reused, as components reuse theirs: the TLS handshake is not counted.
"""
from __future__ import annotations

import asyncio
import pathlib
import statistics
import tempfile
import time

import grpc

from pdserve import rpc
from pdserve.certs import make_dev_pki
from pdserve.cluster_auth import METADATA_KEY, ClusterCredential, TlsMaterial, new_secret
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, pair):
        self.pair = pair

    async def intercept_unary_unary(self, continuation, d, request):
        md = grpc.aio.Metadata(*(d.metadata or ()), self.pair)
        return await continuation(grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials,
                                                              d.wait_for_ready), request)


class _Stream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, pair):
        self.pair = pair

    async def intercept_unary_stream(self, continuation, d, request):
        md = grpc.aio.Metadata(*(d.metadata or ()), self.pair)
        return await continuation(grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials,
                                                              d.wait_for_ready), request)


class _Router(router_pb2_grpc.RouterServicer):
    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse()

    async def Generate(self, request, context):
        yield worker_pb2.TokenChunk(req_id=request.req_id, token_ids=[1], finish_reason=worker_pb2.FINISH_REASON_LENGTH)


async def _serve(credential: ClusterCredential | None):
    server = grpc.aio.server() if credential is None else rpc.server(None, credential)
    router_pb2_grpc.add_RouterServicer_to_server(_Router(), server)
    port = rpc.listen(server, "127.0.0.1:0", credential)
    await server.start()
    return server, port


async def _round(stub, calls: int, kind: str) -> list[float]:
    out = []
    for i in range(calls):
        t = time.perf_counter()
        if kind == "unary":
            await stub.ListWorkers(router_pb2.ListWorkersRequest())
        else:
            _ = [c async for c in stub.Generate(router_pb2.RouteRequest(req_id=f"r{i}", model="m",
                                                                        prompt_token_ids=[1]))]
        out.append(time.perf_counter() - t)
    return out


def _stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_us": round(statistics.median(s) * 1e6, 1), "p99_us": round(s[int(0.99 * (len(s) - 1))] * 1e6, 1)}


def _tls(directory: str) -> tuple[TlsMaterial, TlsMaterial]:
    files = make_dev_pki(pathlib.Path(directory), components=("router", "admin"), days=1)
    read = lambda f: TlsMaterial(f.ca_file.read_bytes(), f.cert_file.read_bytes(), f.key_file.read_bytes())  # noqa: E731
    return read(files["router"]), read(files["admin"])


async def _run(calls: int, rounds: int) -> dict:
    secret = new_secret()
    with tempfile.TemporaryDirectory() as directory:
        server_tls, client_tls = _tls(directory)
    servers = {name: await _serve(cred) for name, cred in (
        ("bare", None), ("plain", ClusterCredential()), ("secret", ClusterCredential(secret)),
        ("mtls", ClusterCredential(secret, server_tls)))}
    port = {name: p for name, (_, p) in servers.items()}
    pair = (METADATA_KEY, secret)
    channels = {"bare": grpc.aio.insecure_channel(f"127.0.0.1:{port['bare']}", options=list(rpc.CHANNEL_OPTIONS)),
                "plain": rpc.channel(f"127.0.0.1:{port['plain']}"),
                "secret": rpc.channel(f"127.0.0.1:{port['secret']}", secret),
                "secret_by_interceptor": grpc.aio.insecure_channel(
                    f"127.0.0.1:{port['secret']}", options=list(rpc.CHANNEL_OPTIONS),
                    interceptors=[_Unary(pair), _Stream(pair)]),
                "mtls_and_secret": rpc.channel(f"127.0.0.1:{port['mtls']}", ClusterCredential(secret, client_tls))}
    stubs = {mode: router_pb2_grpc.RouterStub(ch) for mode, ch in channels.items()}
    samples = {(mode, kind): [] for mode in stubs for kind in ("unary", "stream")}
    try:
        for kind in ("unary", "stream"):
            for mode, stub in stubs.items():
                await _round(stub, 50, kind)              # warm-up: connections, code paths
            for _ in range(rounds):
                for mode, stub in stubs.items():
                    samples[(mode, kind)] += await _round(stub, calls, kind)
    finally:
        for ch in channels.values():
            await ch.close()
        for server, _ in servers.values():
            await server.stop(None)
    report = {"calls_per_mode_and_kind": calls * rounds, "results": {}}
    for kind in ("unary", "stream"):
        stats = {mode: _stats(samples[(mode, kind)]) for mode in stubs}
        base = stats["bare"]["p50_us"]
        report["results"][kind] = {mode: {**st, "p50_ratio_to_bare": round(st["p50_us"] / base, 3)}
                                   for mode, st in stats.items()}
    return report


def run(calls: int = 500, rounds: int = 6) -> dict:
    return asyncio.run(_run(calls, rounds))


def format_report(report: dict) -> str:
    lines = [f"{report['calls_per_mode_and_kind']} calls per mode and kind"]
    for kind, modes in report["results"].items():
        for mode, r in modes.items():
            lines.append(f"{kind:<7} {mode:<22} p50 {r['p50_us']:8.1f} us  p99 {r['p99_us']:8.1f} us  "
                         f"x{r['p50_ratio_to_bare']:.3f}")
    return "\n".join(lines)
