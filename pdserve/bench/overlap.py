"""`pdserve bench overlap`: does layer-wise KV transfer hide behind prefill compute?

One run measures, for the same long prompt, on the real model runner, with the KV receiver in a
second process:
- prefill alone (no transfer), the baseline;
- overlapped: each layer is sent as soon as its attention operator finishes (pdserve's path);
- serial: the whole prefill first, then all layers sent (what a non-layer-wise design does).
The quantity that matters for time-to-first-token is the transfer time still exposed after the
last operator finishes: the whole transfer in serial mode, about one layer's worth when overlapped.
End-to-end totals are reported too; on a small CPU-only host compute and transfer share cores, so
totals also show how much the concurrent copy slows the compute threads.
"""
from __future__ import annotations

import multiprocessing as mp
import pathlib
import statistics
import time

import torch

from pdserve.bench.kv import agent_options, receiver_main
from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferLayout, TransferState, as_bytes_view, create_agent
from pdserve.workers.model.execution import OperatorKind, PrefillExecution
from pdserve.workers.model.loader import load_model

_TIMEOUT_S = 120.0


class Link:
    """Sender side in this process, receiver in a spawned one; one transfer at a time."""

    def __init__(self, backend: str):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=receiver_main, args=(child, [backend]), daemon=True)
        self._proc.start()
        self.peer = self._conn.recv()[backend]
        self.agent = create_agent(backend, WallClock(), **agent_options(backend))
        self._backend = backend
        self._next_id = 1

    def arm(self, layer_nbytes: tuple[int, ...]) -> TransferLayout:
        """The receiving process expects a transfer of this layout from now on."""
        layout = TransferLayout(self._next_id, layer_nbytes)
        self._next_id += 1
        self._conn.send((self._backend, layout.transfer_id, list(layer_nbytes)))
        assert self._conn.recv() == "armed"
        return layout

    def open(self, layer_nbytes: tuple[int, ...]):
        return self.agent.create_sender(self.peer, self.arm(layer_nbytes), _TIMEOUT_S)

    def wait_done(self, sender) -> float:
        """When (monotonic s) the receiving process's thread saw the transfer done."""
        state, failure, seen_s = self._conn.recv()
        sender.status.finished.wait(_TIMEOUT_S)
        if state != TransferState.DONE.value or sender.poll() is not TransferState.DONE:
            raise RuntimeError(f"transfer failed: {failure or sender.failure()}")
        return seen_s

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model_name: str, backend: str, prompt_tokens: int, repeats: int, torch_threads: int = 0,
        cache_dir: pathlib.Path = pathlib.Path.home() / ".cache" / "pdserve") -> dict:
    if torch_threads:
        torch.set_num_threads(torch_threads)
    model = load_model(model_name, cache_dir).model
    vocab = model.config.vocab_size
    ids = [(i * 7919) % vocab for i in range(prompt_tokens)]
    nbytes = (prompt_tokens * model.config.kv_bytes_per_token_per_layer,) * model.config.num_layers
    link = Link(backend)

    def prefill_alone() -> tuple[float, float]:
        start = time.perf_counter()
        PrefillExecution(model, ids).run_to_end()
        return time.perf_counter() - start, 0.0

    def overlapped() -> tuple[float, float]:
        start = time.perf_counter()
        tx = link.open(nbytes)
        ex = PrefillExecution(model, ids)
        while not ex.done:
            op = ex.step()
            if op.kind is OperatorKind.ATTENTION:
                tx.send_layer(op.layer, as_bytes_view(op.layer_kv.numpy()))
        tx.finish(b"")
        compute_end = time.perf_counter()
        link.wait_done(tx)
        end = time.perf_counter()
        return end - start, end - compute_end

    def serial() -> tuple[float, float]:
        start = time.perf_counter()
        ex = PrefillExecution(model, ids)
        ex.run_to_end()
        compute_end = time.perf_counter()
        send_all(ex.layer_kv)
        end = time.perf_counter()
        return end - start, end - compute_end

    def send_all(layers) -> None:
        tx = link.open(nbytes)
        for i, kv in enumerate(layers):
            tx.send_layer(i, as_bytes_view(kv.numpy()))
        tx.finish(b"")
        link.wait_done(tx)

    try:
        for fn in (prefill_alone, overlapped, serial):   # warm-up: allocator, endpoints, caches
            fn()
        total = {name: [] for name in ("prefill_alone", "overlapped", "serial")}
        exposed = {name: [] for name in ("overlapped", "serial")}
        for _ in range(repeats):  # interleaved, so drift in machine load hits every mode alike
            for name, fn in (("prefill_alone", prefill_alone), ("overlapped", overlapped), ("serial", serial)):
                t_total, t_exposed = fn()
                total[name].append(t_total)
                if name in exposed:
                    exposed[name].append(t_exposed)
    finally:
        link.close()
    med = {k: round(statistics.median(v) * 1e3, 2) for k, v in total.items()}
    tail = {k: round(statistics.median(v) * 1e3, 2) for k, v in exposed.items()}
    return {
        "model": model_name, "backend": backend, "prompt_tokens": prompt_tokens,
        "torch_threads": torch.get_num_threads(),
        "kv_mib": round(sum(nbytes) / (1 << 20), 2), "repeats": repeats, "median_total_ms": med,
        # Transfer time left after the last operator: what the transfer adds to time-to-first-token.
        "median_exposed_transfer_ms": tail,
        "exposed_ratio_overlapped_vs_serial": round(tail["overlapped"] / tail["serial"], 3),
        "total_ratio_overlapped_vs_prefill": round(med["overlapped"] / med["prefill_alone"], 3),
        "total_ratio_serial_vs_prefill": round(med["serial"] / med["prefill_alone"], 3),
    }


def format_report(r: dict) -> str:
    tot, tail = r["median_total_ms"], r["median_exposed_transfer_ms"]
    return "\n".join([
        f"{r['model']} {r['prompt_tokens']} tokens, {r['kv_mib']} MiB KV over {r['backend']}, "
        f"{r['torch_threads']} compute thread(s), median of {r['repeats']}",
        f"  prefill alone                    {tot['prefill_alone']:9.1f} ms",
        f"  prefill + layer-wise transfer    {tot['overlapped']:9.1f} ms   transfer exposed after compute "
        f"{tail['overlapped']:7.2f} ms",
        f"  prefill, then whole transfer     {tot['serial']:9.1f} ms   transfer exposed after compute "
        f"{tail['serial']:7.2f} ms",
        f"  exposed transfer, overlapped / serial: {r['exposed_ratio_overlapped_vs_serial']:.2f}",
    ])
