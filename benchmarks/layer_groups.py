"""Sending a prefill's KV layer by layer against in groups (`kvtransfer.send_group_bytes`), one run.

    python benchmarks/layer_groups.py [--json] [--model tiny] [--backend ucx] [--prompt-tokens 5,96,293,1024]
                                      [--group-bytes N] [--repeats 60]

The prefill worker's own pieces: the model runs a prompt operator by operator
(PrefillExecution, one torch thread) and hands each finished layer to the worker's KV link
(prefill_side._LazySender), which sends to a receiving process on this host (`pdserve bench
kv`'s). Per prompt length, three ways, interleaved request by request so drift hits each alike:
- alone: the prefill with no transfer, the floor;
- every layer: each layer sent as it finishes (send_group_bytes 0, pdserve's path until now);
- grouped: layers held back until `--group-bytes` are ready (default: the config's), what is
  left sent once the prefill is done, as the worker does.
Each is timed from the prefill's start to the receiving thread seeing the transfer done (a
monotonic stamp from the receiver), which is what the decode worker waits for before the first
token. Reports p50 per way, what the transfer adds over the prefill alone, and grouped / every
layer. The layer size decides: a send has a fixed cost on the compute thread's path (posting,
waking the transfer's thread, which then competes with the next operator for the interpreter)
that a small layer's transfer does not repay.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

_WARMUP = 3
WAYS = ("alone", "every_layer", "grouped")


def _prefill(model, ids: list[int], link) -> None:
    from pdserve.workers.model.execution import OperatorKind, PrefillExecution

    ex = PrefillExecution(model, ids)
    while not ex.done:
        op = ex.step()
        if link is not None and op.kind is OperatorKind.ATTENTION:
            link.send_layer(op.layer, op.layer_kv)


def _timed(model, ids: list[int], link, group_bytes: int | None) -> float:
    from pdserve.workers.prefill_side import _LazySender

    if group_bytes is None:
        start = time.monotonic()
        _prefill(model, ids, None)
        return time.monotonic() - start
    nbytes = (len(ids) * model.config.kv_bytes_per_token_per_layer,) * model.config.num_layers
    layout = link.arm(nbytes)
    start = time.monotonic()
    sender_link = _LazySender(link.agent, link.peer, layout, 60.0, False, group_bytes=group_bytes)
    _prefill(model, ids, sender_link)
    sender_link.flush()
    sender = sender_link.get()
    sender.finish(b"")
    return link.wait_done(sender) - start


def run(model_name: str, backend: str, prompt_tokens: list[int], group_bytes: int, repeats: int) -> dict:
    import torch

    from pdserve.bench.overlap import Link
    from pdserve.workers.model.loader import load_model

    torch.set_num_threads(1)
    model = load_model(model_name, pathlib.Path.home() / ".cache" / "pdserve").model
    link = Link(backend)
    groups = {"alone": None, "every_layer": 0, "grouped": group_bytes}
    sizes = {}
    try:
        for n in prompt_tokens:
            ids = [(i * 7919) % model.config.vocab_size for i in range(n)]
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for i in range(_WARMUP + repeats):
                for way in WAYS:
                    t = _timed(model, ids, link, groups[way])
                    if i >= _WARMUP:
                        times[way].append(t)
            p50 = {way: statistics.median(ts) * 1e3 for way, ts in times.items()}
            sizes[str(n)] = {
                "layer_kib": round(n * model.config.kv_bytes_per_token_per_layer / 1024, 1),
                "p50_ms": {way: round(v, 3) for way, v in p50.items()},
                "added_over_alone_ms": {way: round(p50[way] - p50["alone"], 3) for way in WAYS[1:]},
                "ratio_grouped_vs_every_layer": round(p50["grouped"] / p50["every_layer"], 3)}
    finally:
        link.close()
    return {"model": model_name, "backend": backend, "num_layers": model.config.num_layers,
            "group_bytes": group_bytes, "repeats": repeats, "torch_threads": 1, "prompt_tokens": sizes}


def main() -> int:
    from pdserve.config import KVTransferSettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--backend", default="ucx", choices=("ucx", "tcp"))
    ap.add_argument("--prompt-tokens", default="5,96,293,1024")
    ap.add_argument("--group-bytes", type=int, default=KVTransferSettings().send_group_bytes)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.model, args.backend, [int(x) for x in args.prompt_tokens.split(",")], args.group_bytes, args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']} ({r['num_layers']} layers), KV over {r['backend']}, groups of {r['group_bytes']} bytes, "
          f"1 torch thread, p50 of {r['repeats']}: prefill start -> receiver saw the transfer done")
    print(f"{'tokens':>7}{'layer KiB':>10}{'alone':>9}{'every layer':>13}{'grouped':>9}{'grouped/every':>15}")
    for n, s in r["prompt_tokens"].items():
        p = s["p50_ms"]
        print(f"{n:>7}{s['layer_kib']:>10}{p['alone']:>9.2f}{p['every_layer']:>13.2f}{p['grouped']:>9.2f}"
              f"{s['ratio_grouped_vs_every_layer']:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
