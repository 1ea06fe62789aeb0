"""A local cluster's speed with each worker on its share of the cores vs on every core.

    python benchmarks/worker_threads.py [--json] [--rounds N] [--requests N] [--concurrency 1,8]

LocalCluster gives each worker cpus // (workers + 1) torch threads (`pdserve.launch.threads_env`);
the baseline is torch's default, every core for every worker, which is what local clusters ran
before. Each round runs `pdserve bench gateway`'s measurement (one aggregated tiny worker, router
embedded in the gateway, max_tokens=1; direct gRPC and through the gateway) once per setting,
alternating, so a slow spell of a shared host hits both. Reports each setting's median requests/s
and p50 per path and concurrency, and share / every core.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

from pdserve.bench import gateway
from pdserve.launch import THREADS_ENV, host_cpus


def _one(threads: str | None, num_requests: int, concurrencies: tuple[int, ...]) -> dict:
    before = os.environ.pop(THREADS_ENV, None)
    if threads is not None:
        os.environ[THREADS_ENV] = threads      # a user's choice: LocalCluster keeps it
    try:
        report = gateway.run(num_requests, concurrencies, ("embedded",))
    finally:
        os.environ.pop(THREADS_ENV, None)
        if before is not None:
            os.environ[THREADS_ENV] = before
    return {"threads": report["worker_torch_threads"] or int(threads), **report["deployments"]["embedded"]["results"]}


def run(rounds: int, num_requests: int, concurrencies: tuple[int, ...]) -> dict:
    settings = {"share": None, "every_core": str(host_cpus())}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, threads in settings.items():
            runs[name].append(_one(threads, num_requests, concurrencies))
    rows = {}
    for key in (k for k in runs["share"][0] if k != "threads"):
        row = {}
        for name in settings:
            row[f"{name}_rps"] = round(statistics.median(r[key]["rps"] for r in runs[name]), 1)
            row[f"{name}_p50_ms"] = round(statistics.median(r[key]["p50_ms"] for r in runs[name]), 3)
            row[f"{name}_errors"] = sum(sum(r[key]["errors"].values()) for r in runs[name])
        row["rps_share_vs_every_core"] = round(row["share_rps"] / row["every_core_rps"], 3)
        row["p50_share_vs_every_core"] = round(row["share_p50_ms"] / row["every_core_p50_ms"], 3)
        rows[key] = row
    return {"cpus": host_cpus(), "rounds": rounds, "requests": num_requests,
            "threads": {name: runs[name][0]["threads"] for name in settings}, "results": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    r = run(args.rounds, args.requests, tuple(int(c) for c in args.concurrency.split(",")))
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['cpus']} CPUs; worker threads: share {r['threads']['share']}, every core {r['threads']['every_core']}")
    for key, row in r["results"].items():
        print(f"  {key:<12} share {row['share_rps']:>7} req/s p50 {row['share_p50_ms']:>8} ms | every core "
              f"{row['every_core_rps']:>7} req/s p50 {row['every_core_p50_ms']:>8} ms | x{row['rps_share_vs_every_core']} "
              f"req/s, x{row['p50_share_vs_every_core']} p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
