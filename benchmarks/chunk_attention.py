"""Attention of a prompt chunk after earlier KV: dense mask vs merged softmaxes, side by side.

    python benchmarks/chunk_attention.py [--json] [--repeats N] [--torch-threads T]

For each (new tokens, past tokens) both paths of `attend_after_past` run on the same inputs, in
alternation, and the report gives each one's best time and merged / dense. `cold_causal_ms` is
the same chunk with no past (torch's causal kernel): the cost a cached prefix should not exceed.
Shapes are tiny's attention (8 query heads, 4 KV heads of 32, passed as the model passes them:
KV heads not expanded); the choice of path in the model (MERGE_MIN_TOKENS) comes from this table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pdserve.workers.model.attention import MERGE_MIN_TOKENS, attend_after_past

SHAPES = [(5, 288), (96, 197), (245, 48), (512, 512), (952, 48), (2000, 2000), (3266, 48)]
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 32


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 3)


def measure(new_tokens: int, past_tokens: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(new_tokens * 7919 + past_tokens)
    q = torch.randn(1, HEADS, new_tokens, HEAD_DIM, generator=gen)
    k, v = torch.randn(2, 1, KV_HEADS, past_tokens + new_tokens, HEAD_DIM, generator=gen)
    dense = lambda: attend_after_past(q, k, v, past_tokens, merge=False)  # noqa: E731
    merged = lambda: attend_after_past(q, k, v, past_tokens, merge=True)  # noqa: E731
    cold = lambda: attend_after_past(q, k[:, :, past_tokens:], v[:, :, past_tokens:], 0)  # noqa: E731
    max_error = (dense() - merged()).abs().max().item()
    times = {"dense_mask_ms": [], "merged_ms": []}
    for _ in range(repeats):      # alternating, so drift on a shared host hits both alike
        times["dense_mask_ms"].append(_best_ms(dense, 1))
        times["merged_ms"].append(_best_ms(merged, 1))
    row = {"new_tokens": new_tokens, "past_tokens": past_tokens, **{k: min(v) for k, v in times.items()},
           "cold_causal_ms": _best_ms(cold, repeats), "max_abs_difference": float(f"{max_error:.2e}")}
    row["merged_vs_dense"] = round(row["merged_ms"] / row["dense_mask_ms"], 3)
    row["path_in_model"] = "merged" if new_tokens >= MERGE_MIN_TOKENS else "dense_mask"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    with torch.inference_mode():
        rows = [measure(n, p, args.repeats) for n, p in SHAPES]
    report = {"torch_threads": args.torch_threads, "repeats": args.repeats,
              "merge_min_tokens": MERGE_MIN_TOKENS, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(f"{r['new_tokens']:>5} new after {r['past_tokens']:>5}: dense {r['dense_mask_ms']:8.2f} ms  "
                  f"merged {r['merged_ms']:8.2f} ms  x{r['merged_vs_dense']:.2f}  cold {r['cold_causal_ms']:8.2f} ms",
                  file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
