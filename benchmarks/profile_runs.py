"""How long a worker's start-up profile takes, and what it fits: runs per shape as now (until 12
per-layer samples are in, warm-up below 1,024 tokens) against a warm-up and three runs of every
shape (the profiler before 2026-12-04), side by side.

    python benchmarks/profile_runs.py [--json] [--model smollm2-135m] [--torch-threads 1]

Order: current, previous, current again (the second current profile shows the run-to-run spread
the previous one's coefficients should be compared with). Reports seconds and each fit's
coefficients (attention: fixed, per token, per token squared; MLP: fixed, per token; the past term).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pdserve.config import load_config
from pdserve.workers import profiler
from pdserve.workers.model.loader import load_model


def profile(model, min_layer_samples: int, warmup_below_tokens: int) -> dict:
    saved = profiler.MIN_LAYER_SAMPLES, profiler.WARMUP_BELOW_TOKENS
    profiler.MIN_LAYER_SAMPLES, profiler.WARMUP_BELOW_TOKENS = min_layer_samples, warmup_below_tokens
    try:
        started = time.perf_counter()
        cost, _, max_error = profiler.fit_cost_model(model)
        elapsed = time.perf_counter() - started
    finally:
        profiler.MIN_LAYER_SAMPLES, profiler.WARMUP_BELOW_TOKENS = saved
    d = cost.to_dict()
    return {"seconds": round(elapsed, 1), "fit_max_error": round(max_error, 3),
            "attention_coeffs": d["attention_coeffs"], "mlp_coeffs": d["mlp_coeffs"],
            "attention_past_s": d["attention_past_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    model = load_model(args.model, load_config().model.cache_dir).model
    current = (profiler.MIN_LAYER_SAMPLES, profiler.WARMUP_BELOW_TOKENS)
    previous = (sys.maxsize, sys.maxsize)      # every shape: warm-up, then all `repeats` runs
    rows = {"current": profile(model, *current), "previous": profile(model, *previous),
            "current_again": profile(model, *current)}
    report = {"model": args.model, "layers": model.config.num_layers, "torch_threads": args.torch_threads,
              "profiles": rows, "current_vs_previous_seconds": round(rows["current"]["seconds"]
                                                                     / rows["previous"]["seconds"], 3)}
    if args.json:
        print(json.dumps(report))
        return 0
    for name, row in rows.items():
        print(f"{name:<14}{row['seconds']:>7} s  attention {[f'{c:.3g}' for c in row['attention_coeffs']]}  "
              f"mlp {[f'{c:.3g}' for c in row['mlp_coeffs']]}  past {row['attention_past_s']:.3g}")
    print(f"current / previous: x{report['current_vs_previous_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
