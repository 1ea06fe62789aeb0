"""FlowPrefill's cost model with and without the past term, against measured prefills.

    python benchmarks/cost_model_past.py [--model tiny] [--repeats 3] [--torch-threads 1] [--json]

Profiles the model as a prefill worker does (`fit_cost_model`), then times whole prefills
(every operator, the worker's executor) of pieces after earlier KV, shapes the profile did not
see, and reports each model's prediction and relative error side by side: `without_past` is the
same fit with the past term zeroed, which is how pieces after a cached prefix or earlier chunks
were costed before. Rows with no past are the control (both models agree there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

import torch

from pdserve.workers.model.loader import load_model
from pdserve.workers.profiler import fit_cost_model, operator_times_s

# (new tokens, earlier tokens): a cached chat turn, longer turns, late chunks of long prompts.
SHAPES = [(5, 288), (96, 1000), (400, 3000), (1000, 2000), (2000, 1000), (100, 0), (1000, 0)]


def time_prefill_s(model, new_tokens: int, past_tokens: int, repeats: int) -> float:
    operator_times_s(model, new_tokens, past_tokens, seed=0)      # warm-up
    return statistics.median(sum(operator_times_s(model, new_tokens, past_tokens, seed=rep))
                             for rep in range(1, repeats + 1))


def run(model_name: str, repeats: int) -> dict:
    model = load_model(model_name, pathlib.Path.home() / ".cache" / "pdserve").model
    with torch.inference_mode():
        cost, _, _ = fit_cost_model(model)
        without = dataclasses.replace(cost, attention_past_s=0.0)
        rows = []
        for n, p in SHAPES:
            if n + p > model.config.max_position_tokens:
                continue
            measured = time_prefill_s(model, n, p, repeats)
            row = {"new_tokens": n, "past_tokens": p, "measured_ms": round(measured * 1e3, 3)}
            for name, m in (("with_past", cost), ("without_past", without)):
                predicted = m.prefill_s(n, p)
                row[f"{name}_ms"] = round(predicted * 1e3, 3)
                row[f"{name}_error"] = round((predicted - measured) / measured, 3)
            rows.append(row)
    past_rows = [r for r in rows if r["past_tokens"]]
    abs_median = lambda key: statistics.median(abs(r[key]) for r in past_rows)  # noqa: E731
    return {"model": model_name, "torch_threads": torch.get_num_threads(), "repeats": repeats,
            "attention_past_s_per_pair": cost.attention_past_s, "results": rows,
            "summary": {"median_abs_error_with_past": abs_median("with_past_error"),
                        "median_abs_error_without_past": abs_median("without_past_error")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    report = run(args.model, args.repeats)
    if args.json:
        print(json.dumps(report))
        return 0
    for r in report["results"]:
        print(f"{r['new_tokens']:>5} after {r['past_tokens']:>5}: measured {r['measured_ms']:9.2f} ms  with past "
              f"{r['with_past_ms']:9.2f} ({r['with_past_error']:+.0%})  without {r['without_past_ms']:9.2f} "
              f"({r['without_past_error']:+.0%})")
    print(json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
