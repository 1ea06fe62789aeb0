"""A lone worker under a CPU quota: torch's old default (a team per core the host shows) vs the
worker's own default (half the CPUs the quota allows, `pdserve.cpus`).

    python benchmarks/worker_cpu_quota.py [--json] [--quota-cpus 1] [--rounds 3] [--requests 300]   # as root

Needs root and a writable cgroup tree (v1 `cpu` controller or v2 with `cpu` enabled): it makes a
cgroup with the quota, starts one aggregated `tiny` worker in it (as a Kubernetes pod with
`resources.limits.cpu` runs), and sends it gRPC Generate calls (max_tokens=1) straight from this
process, outside the cgroup, at each concurrency. `old_default` sets the thread count torch would
have chosen (every CPU of the affinity mask, the quota unseen); `new_default` sets none, so the
worker reads the quota. Rounds alternate between the two, so a slow spell hits both. Reports each
setting's median requests/s and p50 per concurrency, and new / old.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import grpc

from pdserve.cpus import CGROUP_ROOT, affinity_cpus
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.workers.model.tokenizer import ByteTokenizer

PROMPT = ByteTokenizer().encode("Measure the control plane, not the model.")
THREADS_ENV = "PDSERVE_MODEL__TORCH_NUM_THREADS"
PERIOD_US = 100_000


def make_cgroup(quota_cpus: float) -> pathlib.Path:
    """A cgroup with the quota, v1 or v2; SystemExit saying why when none can be made."""
    quota_us = int(quota_cpus * PERIOD_US)
    name = f"pdserve-bench-{os.getpid()}"
    v1 = CGROUP_ROOT / "cpu"
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            path = v1 / name
            path.mkdir()
            (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota_us))
        else:
            path = CGROUP_ROOT / name
            path.mkdir()
            (path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
    except OSError as exc:
        raise SystemExit(f"cannot make a cgroup with a CPU quota under {CGROUP_ROOT} ({exc}): run as root on a "
                         "host whose cgroup tree is writable, with the cpu controller enabled") from exc
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(cgroup: pathlib.Path, port: int, threads: int | None, db_dir: str) -> subprocess.Popen:
    env = {**os.environ, "PDSERVE_MODEL__NAME": "tiny", "PDSERVE_WORKER__PORT": str(port),
           "PDSERVE_DATABASE__URL": f"sqlite:///{db_dir}/bench.db"}
    env.pop(THREADS_ENV, None)
    if threads is not None:
        env[THREADS_ENV] = str(threads)
    # The shell joins the cgroup, then becomes the worker: every thread it starts is inside.
    cmd = f'echo $$ > "{cgroup}/cgroup.procs" && exec "{sys.executable}" -m pdserve.cli serve aggregated'
    return subprocess.Popen(["sh", "-c", cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _measure(port: int, num_requests: int, concurrencies: list[int]) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        deadline = time.monotonic() + 180      # a first start profiles the model
        while True:
            try:
                await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=1)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

        async def one() -> None:
            request = worker_pb2.GenerateRequest(req_id=uuid.uuid4().hex, prompt_token_ids=PROMPT,
                                                 sampling=worker_pb2.SamplingParams(max_tokens=1))
            async for _ in stub.Generate(request):
                pass
        for _ in range(30):                    # warm-up: connection, first allocations
            await one()
        out = {}
        for c in concurrencies:
            latencies, left = [], [num_requests]

            async def client() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    started = time.perf_counter()
                    await one()
                    latencies.append(time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(c)))
            out[c] = {"rps": num_requests / (time.perf_counter() - started), "p50_ms": 1e3 * statistics.median(latencies)}
        return out


def run(quota_cpus: float, rounds: int, num_requests: int, concurrencies: list[int]) -> dict:
    cgroup = make_cgroup(quota_cpus)
    settings = {"old_default": affinity_cpus(), "new_default": None}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    try:
        with tempfile.TemporaryDirectory() as db_dir:
            for _ in range(rounds):
                for name, threads in settings.items():
                    port = _free_port()
                    proc = start_worker(cgroup, port, threads, db_dir)
                    try:
                        runs[name].append(asyncio.run(_measure(port, num_requests, concurrencies)))
                    finally:
                        proc.terminate()
                        proc.wait(30)
    finally:
        cgroup.rmdir()
    results = {}
    for c in concurrencies:
        row = {}
        for name in settings:
            row[f"{name}_rps"] = round(statistics.median(r[c]["rps"] for r in runs[name]), 1)
            row[f"{name}_p50_ms"] = round(statistics.median(r[c]["p50_ms"] for r in runs[name]), 2)
        row["rps_new_vs_old"] = round(row["new_default_rps"] / row["old_default_rps"], 3)
        row["p50_new_vs_old"] = round(row["new_default_p50_ms"] / row["old_default_p50_ms"], 3)
        results[f"c{c}"] = row
    return {"quota_cpus": quota_cpus, "affinity_cpus": affinity_cpus(), "old_default_threads": settings["old_default"],
            "rounds": rounds, "requests": num_requests, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota-cpus", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = run(args.quota_cpus, args.rounds, args.requests, [int(c) for c in args.concurrency.split(",")])
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['quota_cpus']:g}-CPU quota, {r['affinity_cpus']} CPUs in the affinity mask; old default "
          f"{r['old_default_threads']} threads, new default from the quota")
    for c, row in r["results"].items():
        print(f"  {c:<4} old {row['old_default_rps']:>7} req/s p50 {row['old_default_p50_ms']:>7} ms | new "
              f"{row['new_default_rps']:>7} req/s p50 {row['new_default_p50_ms']:>7} ms | x{row['rps_new_vs_old']} "
              f"req/s, x{row['p50_new_vs_old']} p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
