"""What UCX itself takes to move one message between two processes, beside the UCX agent.

    python benchmarks/ucx_floor.py [--json] [--sizes-mib 0.25,1,4] [--repeats 200]

The floor: two processes, one ucxx worker each, no agent: the sender posts a tag send of the
buffer and a receive for an 8-byte reply; the receiver has its receive posted, and replies once
the data is in, with the moment it saw the data in (the monotonic clock, which the processes of
a host share). Timed from the send to that moment (the same span as `pdserve bench kv`: data in
place on the other side, seen there), with each side waiting on its worker one of two ways: spinning on progress (`busy`, the lowest latency, a core per process) or sleeping on
the worker's event descriptor (`blocking`, what the agent does). The agent's row is
`pdserve bench kv`'s measurement in the same run. Reports p50 per size and agent / blocking floor.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import select
import sys
import time

import numpy as np

MIB = 1 << 20
_REPLY_TAG = 1 << 40


def _worker():
    from pdserve.kvtransfer.backends.ucx import _prepare_ucx_environment
    _prepare_ucx_environment()
    from ucxx._lib import libucxx
    context = libucxx.UCXContext({"TLS": "tcp,sm,self"})
    return libucxx, context, libucxx.UCXWorker(context, enable_delayed_submission=False,
                                               enable_python_future=False)


class _Waiter:
    def __init__(self, worker, blocking: bool):
        self.worker, self.blocking = worker, blocking
        if blocking:
            worker.init_blocking_progress_mode()
            self.poll = select.poll()
            self.poll.register(worker.epoll_file_descriptor, select.POLLIN)

    def wait(self, request) -> None:
        while True:
            while self.worker.progress():
                pass
            if request.completed:
                return request.check_error()
            if self.blocking and self.worker.arm():
                self.poll.poll(1000)


def _tag(value: int):
    from ucxx.types import Tag
    return Tag(value)


def _array(buf):
    from ucxx._lib.arr import Array
    return Array(buf)


def _endpoint(lib, worker, address: bytes):
    return lib.UCXEndpoint.create_from_worker_address(worker, lib.UCXAddress.create_from_buffer(address), False)


def _peer(conn, size: int, count: int, blocking: bool) -> None:
    lib, _context, worker = _worker()
    conn.send(bytes(worker.address))
    ep = _endpoint(lib, worker, conn.recv())
    waiter = _Waiter(worker, blocking)
    dest, reply = np.zeros(size, np.uint8), np.zeros(1, np.float64)
    request = worker.tag_recv(_array(dest), _tag(1))
    conn.send("ready")
    for i in range(count):
        waiter.wait(request)
        reply[0] = time.monotonic()
        if i + 1 < count:
            request = worker.tag_recv(_array(dest), _tag(i + 2))
        waiter.wait(ep.tag_send(_array(reply), _tag(_REPLY_TAG | i)))


def floor_p50_ms(size: int, repeats: int, blocking: bool) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    count = repeats + 10
    proc = ctx.Process(target=_peer, args=(child, size, count, blocking), daemon=True)
    proc.start()
    try:
        lib, _context, worker = _worker()
        ep = _endpoint(lib, worker, parent.recv())
        parent.send(bytes(worker.address))
        assert parent.recv() == "ready"
        waiter = _Waiter(worker, blocking)
        src, reply = np.ones(size, np.uint8), np.zeros(1, np.float64)
        times = []
        for i in range(count):
            start = time.monotonic()
            done = worker.tag_recv(_array(reply), _tag(_REPLY_TAG | i))
            waiter.wait(ep.tag_send(_array(src), _tag(i + 1)))
            waiter.wait(done)
            times.append(float(reply[0]) - start)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    ordered = sorted(times[10:])      # the first ones set up the endpoint and registrations
    return ordered[len(ordered) // 2] * 1e3


def run(sizes_mib: list[float], repeats: int) -> dict:
    from pdserve.bench import kv
    agent = {r["size_mib"]: r for r in kv.run(["ucx"], sizes_mib, 1, min(repeats, 50))["results"]
             if r["backend"] == "ucx"}
    rows = []
    for size_mib in sizes_mib:
        size = int(size_mib * MIB)
        busy = floor_p50_ms(size, repeats, blocking=False)
        blocking = floor_p50_ms(size, repeats, blocking=True)
        agent_ms = agent[size_mib]["latency_p50_ms"]
        rows.append({"size_mib": size_mib, "busy_p50_ms": round(busy, 3), "blocking_p50_ms": round(blocking, 3),
                     "agent_p50_ms": agent_ms, "agent_over_blocking": round(agent_ms / blocking, 2),
                     "blocking_gbps": round(size / blocking / 1e6, 2)})
    return {"repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes-mib", default="0.25,1,4")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    report = run([float(x) for x in args.sizes_mib.split(",")], args.repeats)
    if args.json:
        print(json.dumps(report))
        return
    for row in report["rows"]:
        print(f"{row['size_mib']:>6} MiB  busy {row['busy_p50_ms']:.3f} ms  blocking {row['blocking_p50_ms']:.3f} ms "
              f"({row['blocking_gbps']} GB/s)  agent {row['agent_p50_ms']:.3f} ms  "
              f"agent/blocking x{row['agent_over_blocking']}", file=sys.stdout)


if __name__ == "__main__":
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    main()
