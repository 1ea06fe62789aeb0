"""The UCX agent's spin (`kvtransfer.ucx_spin_us`) against none, interleaved in one run.

    python benchmarks/ucx_spin.py [--json] [--spin-us 50] [--sizes-mib 0.25,1,4] [--layers 1] [--repeats 100]

Two processes, one UCX agent each, as `pdserve bench kv`. Transfers alternate: odd ones with both
agents spinning `--spin-us`, even ones with neither, so both settings see the same host, the same
noise and the same warm buffers (separate runs on this 2-vCPU VM differ by more than the effect).
Each transfer is timed as `pdserve bench kv` times it, up to the receiver's thread seeing it done.
Reports per size and setting p50, p90 and the best transfer's bandwidth, and spin / none ratios.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import sys

import numpy as np

MIB = 1 << 20
_WARMUP = 4


def _set_spin(spin_s: float, agent, transfer_id: int) -> None:
    """Odd transfers spin, even ones do not (both agents alike)."""
    agent.engine.set_spin_s(spin_s if transfer_id % 2 else 0.0)


def _summary(size: int, times_s: list[float]) -> dict:
    ordered = sorted(times_s)
    return {"p50_ms": round(ordered[len(ordered) // 2] * 1e3, 3),
            "p90_ms": round(ordered[len(ordered) * 9 // 10] * 1e3, 3),
            "best_gbps": round(size / ordered[0] / 1e9, 2)}


def run(spin_us: float, sizes_mib: list[float], num_layers: int, repeats: int) -> dict:
    from pdserve.bench.kv import one_transfer, receiver_main, reply
    from pdserve.clock import WallClock
    from pdserve.kvtransfer import create_agent
    spin_s = spin_us / 1e6
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, ["ucx"], None, functools.partial(_set_spin, spin_s)),
                       daemon=True)
    proc.start()
    rows = []
    try:
        peer = reply(parent, proc)["ucx"]
        agent = create_agent("ucx", WallClock())
        transfer_id = 1
        for size_mib in sizes_mib:
            size = int(size_mib * MIB)
            bufs = [np.full(size // num_layers, i % 251, dtype=np.uint8) for i in range(num_layers)]
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(_WARMUP + 2 * repeats):
                _set_spin(spin_s, agent, transfer_id)
                seen_s, _replied_s = one_transfer(agent, parent, proc, "ucx", peer, transfer_id, bufs)
                if i >= _WARMUP:
                    times[bool(transfer_id % 2)].append(seen_s)
                transfer_id += 1
            on, off = _summary(size, times[True]), _summary(size, times[False])
            rows.append({"size_mib": size_mib, "spin": on, "none": off,
                         "p50_ratio": round(on["p50_ms"] / off["p50_ms"], 3),
                         "best_gbps_ratio": round(on["best_gbps"] / off["best_gbps"], 3)})
    finally:
        parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return {"spin_us": spin_us, "num_layers": num_layers, "repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--spin-us", type=float, default=50.0)
    parser.add_argument("--sizes-mib", default="0.25,1,4")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100, help="timed transfers per size and setting")
    args = parser.parse_args()
    report = run(args.spin_us, [float(x) for x in args.sizes_mib.split(",")], args.layers, args.repeats)
    if args.json:
        print(json.dumps(report))
        return
    for row in report["rows"]:
        on, off = row["spin"], row["none"]
        print(f"{row['size_mib']:>6} MiB x{report['num_layers']} layers  spin {on['p50_ms']:.3f} / "
              f"{on['p90_ms']:.3f} ms, best {on['best_gbps']} GB/s   none {off['p50_ms']:.3f} / {off['p90_ms']:.3f} ms, "
              f"best {off['best_gbps']} GB/s   p50 x{row['p50_ratio']}, best x{row['best_gbps_ratio']}")


if __name__ == "__main__":
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    sys.exit(main())
