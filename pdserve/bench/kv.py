"""`pdserve bench kv`: KV transfer bandwidth between two processes, per backend and size.

The sender runs in this process, the receiver in a spawned one; a memcpy row (one process,
np.copyto) is the physical limit the backends are compared with. Each (backend, size) times
`repeats` transfers after two warm-ups (connection setup, memory registration) and reports the
bandwidth of the best one and the latency p50/p99 over all. The time runs from the first
send_layer() to the receiving process's thread seeing the transfer DONE, stamped there on the
monotonic clock, which all processes of a host share. The pipe that carries the stamp back is
the harness's, not the transfer's: it added 50-140 us on a 2-core host (a third of a 1 MiB
transfer); the time until the sender hears back through it is reported beside
(`reply_p50_ms`), as earlier releases measured.
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


def agent_options(backend: str, ucx_spin_us: float | None = None) -> dict:
    if backend == "tcp":
        return {"host": "127.0.0.1"}
    return {} if backend != "ucx" or ucx_spin_us is None else {"spin_s": ucx_spin_us / 1e6}


def wait_ended(status, timeout_s: float) -> TransferState:
    status.finished.wait(timeout_s)
    return status.poll()


def receiver_main(conn, backends: list[str], ucx_spin_us: float | None = None, prepare=None) -> None:
    """The receiving process. `prepare(agent, transfer_id)`, if given (picklable: a module-level
    function or a partial of one), runs before each transfer is armed."""
    agents = {b: create_agent(b, WallClock(), **agent_options(b, ucx_spin_us)) for b in backends}
    conn.send({b: a.address() for b, a in agents.items()})
    # Destinations are reused and pre-touched, as a decode worker's resident KV pool would be;
    # fresh np.empty pages would add first-touch page faults to the transfer time.
    dests: dict[int, np.ndarray] = {}
    while (msg := conn.recv()) is not None:
        backend, transfer_id, layer_nbytes = msg
        if prepare is not None:
            prepare(agents[backend], transfer_id)
        layout = TransferLayout(transfer_id, tuple(layer_nbytes))
        dest = dests.setdefault(layout.total_nbytes, np.zeros(layout.total_nbytes, dtype=np.uint8))
        rx = agents[backend].create_receiver(layout, memoryview(dest), _TIMEOUT_S)
        conn.send("armed")
        state = wait_ended(rx.status, _TIMEOUT_S)
        seen_s = time.monotonic()
        conn.send((state.value, rx.failure(), seen_s))


def one_transfer(agent, conn, proc, backend: str, peer: bytes, transfer_id: int,
                  bufs: list[np.ndarray]) -> tuple[float, float]:
    """(seconds until the receiver saw it done, seconds until this process heard so)."""
    layout = TransferLayout(transfer_id, tuple(b.nbytes for b in bufs))
    conn.send((backend, transfer_id, list(layout.layer_nbytes)))
    assert reply(conn, proc) == "armed"
    start_s = time.monotonic()
    tx = agent.create_sender(peer, layout, _TIMEOUT_S)
    for i, buf in enumerate(bufs):
        tx.send_layer(i, memoryview(buf))
    tx.finish(b"")
    state, failure, seen_s = reply(conn, proc)
    replied_s = time.monotonic() - start_s
    wait_ended(tx.status, _TIMEOUT_S)
    if state != TransferState.DONE.value:
        raise RuntimeError(f"{backend} transfer failed: {failure}")
    if not start_s < seen_s <= start_s + replied_s:
        raise RuntimeError("the receiver's clock is not this process's monotonic clock")
    return seen_s - start_s, replied_s


def reply(conn, proc, timeout_s: float = _TIMEOUT_S + 10):
    """The receiver process's next message; an error, not a hang, if it died or went silent."""
    end_s = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"the receiver process exited (code {proc.exitcode}); its error is above")
        if time.monotonic() > end_s:
            raise RuntimeError(f"the receiver process sent nothing for {timeout_s:.0f} s")
    return conn.recv()


def memcpy_gbps(size_bytes: int, repeats: int) -> float:
    src = np.ones(size_bytes, dtype=np.uint8)
    # Destination 2 KiB off the source's alignment: equal page offsets slow small copies 10x on
    # some CPUs (4K aliasing), which would understate the limit the backends are compared with.
    dst = np.empty(size_bytes + 2048, dtype=np.uint8)[2048:]
    np.copyto(dst, src)
    # Small copies are timed in runs of several, so the timer's own cost does not count.
    inner = max(1, (16 * MIB) // max(1, size_bytes))

    def copies() -> None:
        for _ in range(inner):
            np.copyto(dst, src)
    best = min(_timed(copies) for _ in range(repeats))
    return size_bytes * inner / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(backends: list[str], sizes_mib: list[float], num_layers: int = 1, repeats: int = 20,
        ucx_spin_us: float | None = None) -> dict:
    """`ucx_spin_us`: the UCX agents' spin (None: the agent's default)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child, backends, ucx_spin_us), daemon=True)
    proc.start()
    results = []
    try:
        peers = reply(parent, proc)
        agents = {b: create_agent(b, WallClock(), **agent_options(b, ucx_spin_us)) for b in backends}
        transfer_id = 1
        for size_mib in sizes_mib:
            size = int(size_mib * MIB)
            results.append({"backend": "memcpy", "size_mib": size_mib,
                            "gbps": round(memcpy_gbps(size, repeats), 3)})
            bufs = [np.full(size // num_layers, i % 251, dtype=np.uint8) for i in range(num_layers)]
            for backend in backends:
                times = []
                for _ in range(_WARMUP + repeats):
                    times.append(one_transfer(agents[backend], parent, proc, backend, peers[backend], transfer_id, bufs))
                    transfer_id += 1
                seen, replied = zip(*times[_WARMUP:])
                results.append(_row(backend, size_mib, size, list(seen), list(replied)))
    finally:
        try:
            parent.send(None)
        except OSError:     # the receiver is gone already
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return {"num_layers": num_layers, "repeats": repeats, "results": _with_ratios(results)}


def _pct_ms(times_s: list[float], q: float) -> float:
    ordered = sorted(times_s)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)


def _row(backend: str, size_mib: float, size: int, times_s: list[float], replied_s: list[float]) -> dict:
    return {"backend": backend, "size_mib": size_mib, "gbps": round(size / min(times_s) / 1e9, 3),
            "latency_p50_ms": _pct_ms(times_s, 0.5), "latency_p99_ms": _pct_ms(times_s, 0.99),
            "reply_p50_ms": _pct_ms(replied_s, 0.5)}


def _with_ratios(rows: list[dict]) -> list[dict]:
    memcpy = {r["size_mib"]: r["gbps"] for r in rows if r["backend"] == "memcpy"}
    for r in rows:
        if r["backend"] != "memcpy":
            r["ratio_to_memcpy"] = round(r["gbps"] / memcpy[r["size_mib"]], 3)
    return rows
