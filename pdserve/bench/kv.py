"""`pdserve bench kv`: KV transfer bandwidth between two processes, per backend and size.

The sender runs in this process, the receiver in a spawned one; a memcpy row (one process,
np.copyto) is the physical limit the backends are compared with. Each (backend, size) takes the
best of `repeats` timed transfers after two warm-ups (connection setup, memory registration).
The time runs from the first send_layer() to the receiver reporting DONE through a pipe.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState, create_agent

MIB = 1 << 20
_TIMEOUT_S = 60.0
# Untimed transfers first: endpoint creation, memory registration, first-touch of buffers.
_WARMUP = 2


def agent_options(backend: str) -> dict:
    return {"host": "127.0.0.1"} if backend == "tcp" else {}


def wait_ended(status, timeout_s: float) -> TransferState:
    status.finished.wait(timeout_s)
    return status.poll()


def receiver_main(conn, backends: list[str]) -> None:
    agents = {b: create_agent(b, WallClock(), **agent_options(b)) for b in backends}
    conn.send({b: a.address() for b, a in agents.items()})
    # Destinations are reused and pre-touched, as a decode worker's resident KV pool would be;
    # fresh np.empty pages would add first-touch page faults to the transfer time.
    dests: dict[int, np.ndarray] = {}
    while (msg := conn.recv()) is not None:
        backend, transfer_id, layer_nbytes = msg
        layout = TransferLayout(transfer_id, tuple(layer_nbytes))
        dest = dests.setdefault(layout.total_nbytes, np.zeros(layout.total_nbytes, dtype=np.uint8))
        rx = agents[backend].create_receiver(layout, memoryview(dest), _TIMEOUT_S)
        conn.send("armed")
        state = wait_ended(rx.status, _TIMEOUT_S)
        conn.send((state.value, rx.failure()))


def _one_transfer(agent, conn, backend: str, peer: bytes, transfer_id: int,
                  bufs: list[np.ndarray]) -> float:
    layout = TransferLayout(transfer_id, tuple(b.nbytes for b in bufs))
    conn.send((backend, transfer_id, list(layout.layer_nbytes)))
    assert conn.recv() == "armed"
    start = time.perf_counter()
    tx = agent.create_sender(peer, layout, _TIMEOUT_S)
    for i, buf in enumerate(bufs):
        tx.send_layer(i, memoryview(buf))
    tx.finish(b"")
    state, failure = conn.recv()
    elapsed = time.perf_counter() - start
    wait_ended(tx.status, _TIMEOUT_S)
    if state != TransferState.DONE.value:
        raise RuntimeError(f"{backend} transfer failed: {failure}")
    return elapsed


def memcpy_gbps(size_bytes: int, repeats: int) -> float:
    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return size_bytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(backends: list[str], sizes_mib: list[int], num_layers: int = 1, repeats: int = 3) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, backends), daemon=True)
    proc.start()
    results = []
    try:
        peers = parent.recv()
        agents = {b: create_agent(b, WallClock(), **agent_options(b)) for b in backends}
        transfer_id = 1
        for size_mib in sizes_mib:
            size = size_mib * MIB
            results.append({"backend": "memcpy", "size_mib": size_mib,
                            "gbps": round(memcpy_gbps(size, repeats), 3)})
            bufs = [np.full(size // num_layers, i % 251, dtype=np.uint8) for i in range(num_layers)]
            for backend in backends:
                times = []
                for _ in range(_WARMUP + repeats):
                    times.append(_one_transfer(agents[backend], parent, backend, peers[backend], transfer_id, bufs))
                    transfer_id += 1
                results.append({"backend": backend, "size_mib": size_mib,
                                "gbps": round(size / min(times[_WARMUP:]) / 1e9, 3)})
    finally:
        parent.send(None)
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return {"num_layers": num_layers, "repeats": repeats, "results": _with_ratios(results)}


def _with_ratios(rows: list[dict]) -> list[dict]:
    memcpy = {r["size_mib"]: r["gbps"] for r in rows if r["backend"] == "memcpy"}
    for r in rows:
        if r["backend"] != "memcpy":
            r["ratio_to_memcpy"] = round(r["gbps"] / memcpy[r["size_mib"]], 3)
    return rows
