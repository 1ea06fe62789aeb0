"""Production traces shipped with pdserve, and loaders for traces of your own.

Built in (xz-compressed, content unmodified; licences and attribution in `data/`):
- `azure-conv`, `azure-code`: Azure LLM inference trace 2023 (CC-BY-4.0; Patel et al.,
  "Splitwise", ISCA 2024). `code` is bursty and prefill-heavy, `conv` chattier.
- `mooncake-conversation`, `mooncake-synthetic`: Mooncake FAST'25 traces (Apache-2.0; Qin et al.,
  FAST 2025), with hash_ids (one per 512-token block; shared prefixes share ids).

A file of your own (`load_file`) may be Azure CSV, Mooncake JSONL or a plain CSV of
`timestamp_s,input_tokens,output_tokens[,session_id]`, optionally .gz or .xz compressed. A file
that cannot be read or parsed raises TraceError, whose message is one line naming file and line.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
MOONCAKE_BLOCK_TOKENS = 512

BUILTIN = {
    "azure-conv": "azure2023/AzureLLMInferenceTrace_conv.csv.xz",
    "azure-code": "azure2023/AzureLLMInferenceTrace_code.csv.xz",
    "mooncake-conversation": "mooncake_fast25/conversation_trace.jsonl.xz",
    "mooncake-synthetic": "mooncake_fast25/synthetic_trace.jsonl.xz",
}


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float        # seconds since the trace's first request
    input_tokens: int
    output_tokens: int
    # Mooncake: hashes of the prompt's 512-token blocks; equal leading hashes = shared prefix.
    block_hashes: tuple[int, ...] = ()
    session_id: str = ""


class TraceError(ValueError):
    """A trace that cannot be read; the message is one line, naming the file (and line)."""


def load(name: str, limit: int | None = None) -> list[TraceRequest]:
    """A built-in trace by name (see BUILTIN)."""
    if name not in BUILTIN:
        raise TraceError(f"unknown trace {name!r}; built in: {', '.join(BUILTIN)}")
    return load_file(DATA_DIR / BUILTIN[name], limit)


def load_file(path: str | pathlib.Path, limit: int | None = None) -> list[TraceRequest]:
    from pdserve.traces.formats import parse_file

    return parse_file(pathlib.Path(path), limit)


def load_named_or_file(name: str | None, path: str | pathlib.Path | None,
                       limit: int | None = None) -> list[TraceRequest]:
    """What a command's `--trace NAME` / `--trace-file PATH` pair selects (the file wins)."""
    return load_file(path, limit) if path else load(name or "azure-conv", limit)


def load_azure(kind: str, limit: int | None = None) -> list[TraceRequest]:
    if kind not in ("code", "conv"):
        raise ValueError("Azure 2023 trace kind is 'code' or 'conv'")
    return load(f"azure-{kind}", limit)


def load_mooncake(kind: str = "conversation", limit: int | None = None) -> list[TraceRequest]:
    if kind not in ("conversation", "synthetic"):
        raise ValueError("Mooncake trace kind is 'conversation' or 'synthetic'")
    return load(f"mooncake-{kind}", limit)
