"""Opt-in request timeline for latency work (`diagnostics.timeline_file`).

Every component process appends one line per stage a request passes, `wall_time_s pid stage
req_id`, to one file shared by the processes of a host (appends of one short line are atomic).
`pdserve bench timeline` starts a cluster with it on, sends requests one at a time and reads the
file back, so where a request's time goes is measured rather than guessed. Off, `mark` costs
one global lookup; on, one `write` system call per stage.
"""
from __future__ import annotations

import os
import pathlib
import time

_fd: int | None = None


def enable(path: str) -> None:
    """Start appending to `path` (this process); an empty path leaves the timeline off."""
    global _fd
    if path and _fd is None:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


def disable() -> None:
    global _fd
    if _fd is not None:
        os.close(_fd)
        _fd = None


def mark(stage: str, req_id: str) -> None:
    if _fd is not None:
        os.write(_fd, f"{time.time():.6f} {os.getpid()} {stage} {req_id}\n".encode())


def read(path: str | pathlib.Path) -> dict[str, dict[str, float]]:
    """req_id -> stage -> when (wall-clock s) the request first passed it."""
    out: dict[str, dict[str, float]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            out.setdefault(parts[3], {}).setdefault(parts[2], float(parts[0]))
    return out
