"""Loaders for the production traces in ../shared/traces (read in place, never copied).

Azure LLM inference trace 2023 (CC-BY-4.0; Patel et al., "Splitwise", ISCA 2024): CSV with
TIMESTAMP, ContextTokens, GeneratedTokens; `code` is bursty and prefill-heavy, `conv` chattier.
Mooncake FAST'25 traces (Apache-2.0; Qin et al., FAST 2025): JSONL with timestamp (ms),
input_length, output_length and hash_ids (one per 512-token block, shared prefixes share ids).
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
    # Mooncake: hashes of the prompt's 512-token blocks; equal leading hashes = shared prefix.
    block_hashes: tuple[int, ...] = ()


MOONCAKE_BLOCK_TOKENS = 512


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


def load_mooncake(kind: str = "conversation", root: pathlib.Path | None = None,
                  limit: int | None = None) -> list[TraceRequest]:
    import json

    if kind not in ("conversation", "synthetic"):
        raise ValueError("Mooncake trace kind is 'conversation' or 'synthetic'")
    path = (root or shared_dir()) / "traces" / "mooncake_fast25" / f"{kind}_trace.jsonl"
    out: list[TraceRequest] = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            out.append(TraceRequest(row["timestamp"] / 1e3, int(row["input_length"]), int(row["output_length"]),
                                    tuple(row.get("hash_ids", ()))))
            if limit is not None and len(out) >= limit:
                break
    t0 = out[0].arrival_s if out else 0.0
    return [TraceRequest(r.arrival_s - t0, r.input_tokens, r.output_tokens, r.block_hashes) for r in out]
