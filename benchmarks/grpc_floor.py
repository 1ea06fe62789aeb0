"""What one grpc.aio call costs on this host with no pdserve code: the floor under every leg of a
request's path between the gateway, router and workers.

    python benchmarks/grpc_floor.py [--json] [--calls 1000]

A grpc.aio server in a spawned process serves the standard health service (no interceptors, no
credentials); this process calls Check over one reused channel, one call at a time, with uvloop
as pdserve's components run it. Reports the round trip's p10/p50/p99 after 50 warm-up calls.
`pdserve bench timeline` shows the same legs inside pdserve; `pdserve bench auth` what pdserve's
interceptors add to a call.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

_WARMUP = 50


def _serve(ports) -> None:
    import grpc
    import uvloop
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()
    uvloop.run(main())


async def _calls(port: int, count: int) -> list[float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        times = []
        for i in range(_WARMUP + count):
            start = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest())
            if i >= _WARMUP:
                times.append(time.perf_counter() - start)
    return times


def run(count: int) -> dict:
    import uvloop
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    try:
        times = sorted(uvloop.run(_calls(ports.get(timeout=60), count)))
    finally:
        server.kill()
    pct = lambda q: round(times[min(len(times) - 1, int(q * len(times)))] * 1e3, 3)  # noqa: E731
    return {"calls": count, "unary_rtt_ms": {"p10": pct(0.1), "p50": pct(0.5), "p99": pct(0.99)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    report = run(args.calls)
    if args.json:
        print(json.dumps(report))
        return
    rtt = report["unary_rtt_ms"]
    print(f"grpc.aio unary round trip between two processes ({report['calls']} calls): "
          f"p10 {rtt['p10']:.3f} ms  p50 {rtt['p50']:.3f} ms  p99 {rtt['p99']:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
