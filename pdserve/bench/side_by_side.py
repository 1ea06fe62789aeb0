"""Shared by the before/after micro-benchmarks in `benchmarks/` (model_ops.py, sampling.py): one
way to time two implementations against each other and one set of options."""
from __future__ import annotations

import argparse
import pathlib
import time
from typing import Callable


def alternate(before: Callable[[], object], now: Callable[[], object], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of `before` and `now`, `repeats` each, alternating (and swapping which
    goes first), so a shared host's drift hits both alike."""
    times: dict[str, list[float]] = {"before": [], "now": []}
    pair = [("before", before), ("now", now)]
    for i in range(repeats):
        for key, fn in pair if i % 2 else pair[::-1]:
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def model_bench_parser(description: str, default_repeats: int) -> argparse.ArgumentParser:
    """--model, --repeats, --torch-threads, --cache-dir and --json (one document on stdout)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=default_repeats)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=str(pathlib.Path.home() / ".cache" / "pdserve"))
    parser.add_argument("--json", action="store_true")
    return parser
