"""Time until a local cluster serves: components started together vs one after another.

    python benchmarks/cluster_start.py [--json] [--rounds N] [--prefill P] [--decode D]

`LocalCluster.start` starts the router, then a model's first worker alone (it profiles and caches
the profile), then every other worker and the gateway together. The baseline is the same
launcher waiting for each process before starting the next (how it started clusters before).
The two alternate, each on a fresh database, after one start left out (it profiles the model
if the cache directory is fresh), so both read the same cached profile.
Reports each one's median seconds until the gateway answers /ready, and together / sequential.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time

from pdserve.launch import LocalCluster


class SequentialStart(LocalCluster):
    """The baseline: every component waited for before the next one starts."""

    def _launch(self, name, args, env, components=(), wait=True):
        return super()._launch(name, args, env, components, wait=True)


def time_start_s(cls: type[LocalCluster], prefill: int, decode: int) -> float:
    with tempfile.TemporaryDirectory() as db_dir:
        cluster = cls(model="tiny", num_prefill=prefill, num_decode=decode,
                      env={"PDSERVE_DATABASE__URL": f"sqlite:///{db_dir}/bench.db"})
        started = time.perf_counter()
        cluster.start()
        elapsed = time.perf_counter() - started
        cluster.stop()
    return elapsed


def run(rounds: int, prefill: int, decode: int) -> dict:
    time_start_s(LocalCluster, prefill, decode)          # warm-up: the profile and the page cache
    times: dict[str, list[float]] = {"together": [], "sequential": []}
    for _ in range(rounds):
        times["together"].append(time_start_s(LocalCluster, prefill, decode))
        times["sequential"].append(time_start_s(SequentialStart, prefill, decode))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"cluster": f"tiny, {prefill} prefill + {decode} decode", "rounds": rounds,
            "together_s": [round(t, 2) for t in times["together"]],
            "sequential_s": [round(t, 2) for t in times["sequential"]],
            "together_median_s": round(medians["together"], 2), "sequential_median_s": round(medians["sequential"], 2),
            "together_vs_sequential": round(medians["together"] / medians["sequential"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    r = run(args.rounds, args.prefill, args.decode)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['cluster']}: serving after {r['together_median_s']} s started together, "
              f"{r['sequential_median_s']} s one after another (x{r['together_vs_sequential']}; "
              f"medians of {r['rounds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
