"""`pdserve bench gateway`: what the control plane (HTTP gateway + router) adds to a request.

One run, one aggregated `tiny` worker, max_tokens=1, the same prompt:
- direct: gRPC Generate straight to the worker (the baseline);
- gateway: OpenAI HTTP POST /v1/completions -> gateway -> router -> the same worker.
Each path runs at each of `concurrencies` (1, 8 and 32 clients by default). Reports
requests/s, p50/p99 latency, failures by kind (a 429 is counted, not fatal), and the ratios and
added milliseconds of gateway over direct.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
import uuid

import grpc
import httpx

from pdserve.launch import LocalCluster
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers.model.tokenizer import ByteTokenizer

PROMPT = "Measure the control plane, not the model."


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(call, num_requests: int, concurrency: int) -> dict:
    """Latency of successful calls; failures are counted by kind (HTTP status or gRPC code), not fatal."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = list(range(num_requests))

    async def client_loop() -> None:
        while queue:
            queue.pop()
            start = time.perf_counter()
            try:
                await call()
            except httpx.HTTPStatusError as exc:
                errors[str(exc.response.status_code)] = errors.get(str(exc.response.status_code), 0) + 1
                continue
            except (httpx.HTTPError, grpc.aio.AioRpcError) as exc:
                kind = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                continue
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = latencies or [float("nan")]
    return {"requests": num_requests, "concurrency": concurrency, "errors": errors,
            "rps": round(len(latencies) / wall, 1), "p50_ms": round(statistics.median(ok) * 1e3, 3),
            "p99_ms": round(_percentile(ok, 0.99) * 1e3, 3)}


async def _measure(cluster: LocalCluster, num_requests: int, concurrencies: list[int]) -> dict:
    worker_port, gateway_url = cluster.process("aggregated-0").port, cluster.url
    prompt_ids = ByteTokenizer().encode(PROMPT)
    channel = cluster.channel(worker_port)
    stub = worker_pb2_grpc.WorkerStub(channel)

    async def direct() -> None:
        chunks = [c async for c in stub.Generate(worker_pb2.GenerateRequest(
            req_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, sampling=worker_pb2.SamplingParams(max_tokens=1)))]
        assert sum(len(c.token_ids) for c in chunks) <= 1

    async with httpx.AsyncClient(base_url=gateway_url, timeout=30,
                                 limits=httpx.Limits(max_connections=max(concurrencies) * 2)) as http:
        async def gateway() -> None:
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1})
            r.raise_for_status()

        for fn in (direct, gateway):           # warm-up: connections, first-request allocations
            await _drive(fn, 20, 1)
        results = {}
        for c in concurrencies:
            results[f"direct_c{c}"] = await _drive(direct, num_requests, c)
            results[f"gateway_c{c}"] = await _drive(gateway, num_requests, c)
    await channel.close()
    return results


def run(num_requests: int = 300, concurrencies: tuple[int, ...] = (1, 8, 32)) -> dict:
    concurrencies = sorted(set(concurrencies))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    db_dir = tempfile.TemporaryDirectory()
    cluster = LocalCluster(model="tiny", num_prefill=0, num_decode=0, num_aggregated=1,
                           env={"PDSERVE_DATABASE__URL": f"sqlite:///{db_dir.name}/bench.db"}).start()
    try:
        rows = asyncio.run(_measure(cluster, num_requests,
                                    list(concurrencies)))
    finally:
        cluster.stop()
        db_dir.cleanup()
    summary = {}
    for c in concurrencies:
        d, g = rows[f"direct_c{c}"], rows[f"gateway_c{c}"]
        summary[f"c{c}"] = {"rps_ratio_gateway_vs_direct": round(g["rps"] / d["rps"], 3),
                            "p50_added_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                            "p99_added_ms": round(g["p99_ms"] - d["p99_ms"], 3)}
    return {"model": "tiny", "max_tokens": 1, "results": rows, "summary": summary}


def format_report(r: dict) -> str:
    lines = [f"{'path':<12}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  errors"]
    for name, row in r["results"].items():
        lines.append(f"{name.split('_')[0]:<12}{row['concurrency']:>5}{row['rps']:>9}{row['p50_ms']:>9}{row['p99_ms']:>9}"
                     f"  {row['errors'] or 'none'}")
    for c, s in r["summary"].items():
        lines.append(f"{c}: gateway/direct throughput x{s['rps_ratio_gateway_vs_direct']}, "
                     f"added p50 {s['p50_added_ms']} ms, added p99 {s['p99_added_ms']} ms")
    return "\n".join(lines)
