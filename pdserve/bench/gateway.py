"""`pdserve bench gateway`: what the control plane (HTTP gateway + router) adds to a request.

One run, one aggregated `tiny` worker, max_tokens=1, the same prompt, per deployment (the worker
has LocalCluster's share of the cores, reported as `worker_torch_threads`):
- separate: gateway and router in two processes (the default);
- embedded: the router inside the gateway's process (gateway.embedded_router).
Each deployment is its own cluster, measured on two paths at each of `concurrencies` (1, 8 and
32 clients by default), in five rounds that alternate between the paths:
- direct: gRPC Generate straight to the worker (the baseline, measured again per cluster);
- gateway: OpenAI HTTP POST /v1/completions -> gateway -> router -> the same worker.
Reports requests/s, p50/p99 latency, failures by kind (a 429 is counted, not fatal), and the
ratios and added milliseconds of gateway over direct. It also reports the CPU time each process
spent per request on each path (from /proc), which is what throughput on a small host runs out of.
The HTTP load comes from a minimal keep-alive client (http_load.py), so the load generator takes
as little as possible from the cores it shares with what it measures.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import grpc

from pdserve.bench.http_load import HttpStatusError, KeepAliveClient
from pdserve.aio import run_loop
from pdserve.launch import LocalCluster
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers.model.tokenizer import ByteTokenizer

PROMPT = "Measure the control plane, not the model."
_ROUNDS = 5     # each path's requests at one concurrency, in rounds alternating with the other path


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _Tally:
    """One path's results over its rounds."""

    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    num_requests: int = 0

    def row(self, concurrency: int) -> dict:
        ok = self.latencies_s or [float("nan")]
        return {"requests": self.num_requests, "concurrency": concurrency, "errors": self.errors,
                "rps": round(len(self.latencies_s) / self.wall_s, 1),
                "p50_ms": round(statistics.median(ok) * 1e3, 3), "p99_ms": round(_percentile(ok, 0.99) * 1e3, 3),
                "cpu_ms_per_request": {name: round(s / self.num_requests * 1e3, 3) for name, s in self.cpu_s.items()}}


async def _drive(call, num_requests: int, concurrency: int, tally: _Tally, pids: dict[str, int]) -> None:
    """Latency of successful calls; failures are counted by kind (HTTP status or gRPC code), not fatal."""
    queue = list(range(num_requests))

    async def client_loop() -> None:
        while queue:
            queue.pop()
            start = time.perf_counter()
            try:
                await call()
            except HttpStatusError as exc:
                tally.errors[str(exc.status)] = tally.errors.get(str(exc.status), 0) + 1
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError, grpc.aio.AioRpcError) as exc:
                kind = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                tally.errors[kind] = tally.errors.get(kind, 0) + 1
                continue
            tally.latencies_s.append(time.perf_counter() - start)

    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    tally.wall_s += time.perf_counter() - start
    tally.num_requests += num_requests
    for name, pid in pids.items():
        tally.cpu_s[name] = tally.cpu_s.get(name, 0.0) + cpu_s(pid) - cpu_before[name]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


async def _measure(cluster: LocalCluster, num_requests: int, concurrencies: list[int]) -> dict:
    worker_port = cluster.process("aggregated-0").port
    pids = {p.name: p.proc.pid for p in cluster.processes} | {"client": os.getpid()}
    prompt_ids = ByteTokenizer().encode(PROMPT)
    channel = cluster.channel(worker_port)
    stub = worker_pb2_grpc.WorkerStub(channel)

    async def direct() -> None:
        chunks = [c async for c in stub.Generate(worker_pb2.GenerateRequest(
            req_id=uuid.uuid4().hex, prompt_token_ids=prompt_ids, sampling=worker_pb2.SamplingParams(max_tokens=1)))]
        assert sum(len(c.token_ids) for c in chunks) <= 1

    http = KeepAliveClient("127.0.0.1", cluster.gateway_port)
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 1}).encode()
    try:
        async def gateway() -> None:
            await http.post_json("/v1/completions", body)

        for fn in (direct, gateway):           # warm-up: connections, first-request allocations
            await _drive(fn, 20, 1, _Tally(), {})
        results = {}
        for c in concurrencies:
            # Alternating rounds: a shared host's slow spell hits both paths alike.
            tallies = {"direct": _Tally(), "gateway": _Tally()}
            for _ in range(_ROUNDS):
                for name, fn in (("direct", direct), ("gateway", gateway)):
                    await _drive(fn, max(1, num_requests // _ROUNDS), c, tallies[name], pids)
            for name, tally in tallies.items():
                results[f"{name}_c{c}"] = tally.row(c)
    finally:
        await http.close()
    await channel.close()
    return results


DEPLOYMENTS = ("separate", "embedded")


def run(num_requests: int = 300, concurrencies: tuple[int, ...] = (1, 8, 32),
        deployments: tuple[str, ...] = DEPLOYMENTS) -> dict:
    concurrencies = sorted(set(concurrencies))
    if unknown := sorted(set(deployments) - set(DEPLOYMENTS)) or not deployments:
        raise ValueError(f"unknown deployments {unknown}; choose from {', '.join(DEPLOYMENTS)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = {"model": "tiny", "max_tokens": 1, "deployments": {}}
    for deployment in deployments:
        rows, report["worker_torch_threads"] = _run_cluster(deployment == "embedded", num_requests, concurrencies)
        summary = {}
        for c in concurrencies:
            d, g = rows[f"direct_c{c}"], rows[f"gateway_c{c}"]
            summary[f"c{c}"] = {"rps_ratio_gateway_vs_direct": round(g["rps"] / d["rps"], 3),
                                "p50_added_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                                "p99_added_ms": round(g["p99_ms"] - d["p99_ms"], 3)}
        report["deployments"][deployment] = {"results": rows, "summary": summary}
    return report


def _run_cluster(embedded: bool, num_requests: int, concurrencies: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as db_dir:
        cluster = LocalCluster(model="tiny", num_prefill=0, num_decode=0, num_aggregated=1, embedded_router=embedded,
                               env={"PDSERVE_DATABASE__URL": f"sqlite:///{db_dir}/bench.db"}).start()
        try:
            return run_loop(_measure(cluster, num_requests, concurrencies)), cluster.worker_torch_threads
        finally:
            cluster.stop()


def format_report(r: dict) -> str:
    lines = [f"worker: tiny, {r['worker_torch_threads'] or 'configured'} torch thread(s)"]
    for deployment, part in r["deployments"].items():
        lines.append(f"{deployment}: {'router inside the gateway process' if deployment == 'embedded' else 'gateway and router in two processes'}")
        lines.append(f"  {'path':<10}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  cpu ms/request  errors")
        for name, row in part["results"].items():
            cpu = " ".join(f"{k}={v}" for k, v in row["cpu_ms_per_request"].items() if v)
            lines.append(f"  {name.split('_')[0]:<10}{row['concurrency']:>5}{row['rps']:>9}{row['p50_ms']:>9}"
                         f"{row['p99_ms']:>9}  {cpu}  {row['errors'] or 'none'}")
        for c, s in part["summary"].items():
            lines.append(f"  {c}: gateway/direct throughput x{s['rps_ratio_gateway_vs_direct']}, "
                         f"added p50 {s['p50_added_ms']} ms, added p99 {s['p99_added_ms']} ms")
    return "\n".join(lines)
