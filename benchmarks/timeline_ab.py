"""`pdserve bench timeline` for this checkout and a baseline checkout, side by side: rounds
alternate which goes first, so drift on a shared host hits both alike. Reports, per request kind,
time to first token, end to end and where each stage's time went (each a median over requests),
every round's value for both, and the ratio of their medians over rounds (this / baseline).

    git worktree add /tmp/pdserve-base <commit>
    python benchmarks/timeline_ab.py --baseline /tmp/pdserve-base --rounds 3 [--json] -- --decode-load 4

Arguments after `--` go to both `pdserve bench timeline` runs (the baseline's must accept them:
`--decode-load` and `--model` exist since 2026-12-05).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent.parent


def run_timeline(root: pathlib.Path, args: list[str]) -> dict:
    """One `bench timeline` run of the checkout at `root` (its cluster's processes inherit the path)."""
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "timeline", "--json", *args],
                         env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench timeline failed in {root}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def figures(report: dict) -> dict[str, dict[str, float]]:
    """kind -> metric -> ms: first token, end to end, and each stage's time since the previous one."""
    out = {}
    for kind, k in report["kinds"].items():
        row = {"ttft_ms_p50": k["ttft_ms_p50"], "end_to_end_ms_p50": k["end_to_end_ms_p50"]}
        for stage in k["stages"]:
            if stage["since_previous_ms_p50"] is not None:
                row[f"{stage['stage']} (since previous)"] = stage["since_previous_ms_p50"]
        out[kind] = row
    return out


def compare(rounds: list[dict[str, dict]]) -> dict:
    kinds = {}
    for kind in rounds[0]["this"]:
        metrics = {}
        for metric in rounds[0]["this"][kind]:
            this = [r["this"][kind].get(metric) for r in rounds]
            base = [r["baseline"][kind].get(metric) for r in rounds]
            if None in this or None in base:
                continue
            ratio = statistics.median(this) / statistics.median(base) if statistics.median(base) else None
            metrics[metric] = {"this_ms": this, "baseline_ms": base,
                               "ratio_of_medians": round(ratio, 3) if ratio is not None else None}
        kinds[kind] = metrics
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=pathlib.Path, required=True, help="a checkout of the baseline code")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("timeline_args", nargs="*", help="arguments for pdserve bench timeline (after --)")
    a = ap.parse_args()
    roots = {"this": HERE, "baseline": a.baseline.resolve()}
    rounds, extra, errors = [], {}, {}
    for i in range(a.rounds):
        order = ["this", "baseline"] if i % 2 == 0 else ["baseline", "this"]
        got = {}
        for name in order:
            report = run_timeline(roots[name], a.timeline_args)
            got[name] = figures(report)
            extra.setdefault(name, []).append(report.get("decode_load"))
            errors.setdefault(name, []).append(report.get("errors") or {})
            print(f"round {i + 1}: {name} done", file=sys.stderr)
        rounds.append(got)
    # Measured requests that failed, per checkout and round: a metric some round has no value for
    # (every request of its kind failed) is left out of the comparison.
    result = {"timeline_args": a.timeline_args, "rounds": a.rounds, "decode_load": extra, "errors": errors,
              "kinds": compare(rounds)}
    if a.json:
        print(json.dumps(result))
        return 0
    if any(e for per_round in errors.values() for e in per_round):
        print(f"measured requests that failed (HTTP status: count, per round): {errors}")
    for kind, metrics in result["kinds"].items():
        print(f"{kind}: {'metric':<44}{'this (ms, per round)':>30}{'baseline':>30}{'ratio':>8}")
        for metric, m in metrics.items():
            fmt = lambda v: ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
            print(f"  {metric:<48}{fmt(m['this_ms']):>30}{fmt(m['baseline_ms']):>30}{m['ratio_of_medians']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
