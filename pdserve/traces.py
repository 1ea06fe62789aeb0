"""Loaders for the production traces in ../shared/traces (read in place, never copied).

Azure LLM inference trace 2023 (CC-BY-4.0; Patel et al., "Splitwise", ISCA 2024): CSV with
TIMESTAMP, ContextTokens, GeneratedTokens; `code` is bursty and prefill-heavy, `conv` chattier.
"""
from __future__ import annotations

import csv
import datetime as dt
import pathlib
from dataclasses import dataclass

DEFAULT_SHARED = pathlib.Path(__file__).resolve().parent.parent.parent / "shared"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float        # seconds since the trace's first request
    input_tokens: int
    output_tokens: int


def shared_dir() -> pathlib.Path:
    """../shared next to the repository (CI and developer machines lay it out the same way)."""
    return DEFAULT_SHARED


def load_azure(kind: str, root: pathlib.Path | None = None, limit: int | None = None) -> list[TraceRequest]:
    if kind not in ("code", "conv"):
        raise ValueError("Azure 2023 trace kind is 'code' or 'conv'")
    path = (root or shared_dir()) / "traces" / "azure2023" / f"AzureLLMInferenceTrace_{kind}.csv"
    out: list[TraceRequest] = []
    t0 = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            ts = dt.datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
            t0 = ts if t0 is None else t0
            out.append(TraceRequest(ts - t0, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            if limit is not None and len(out) >= limit:
                break
    return out
