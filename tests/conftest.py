"""Shared factories and leak checks for all test suites."""
from __future__ import annotations

import asyncio
import os
import pathlib
import time

import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

from pdserve.workers.model.sampling import SamplingConfig  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_sampling(**kw) -> SamplingConfig:
    return SamplingConfig(**{"max_tokens": 12, **kw})


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def assert_no_leaks(*, allocator=None, agents=(), timeout_s: float = 10.0) -> None:
    """KV blocks all free and no transfer still tracked by any agent (waits out async cleanup)."""
    if allocator is not None:
        assert wait_until(lambda: allocator.num_free_blocks == allocator.num_blocks, timeout_s), \
            f"leaked KV blocks: {allocator.num_blocks - allocator.num_free_blocks}"
    for agent in agents:
        assert wait_until(lambda: agent.num_active_transfers() == 0, timeout_s), \
            f"{agent.backend_name}: {agent.num_active_transfers()} transfers still tracked"


async def eventually(predicate, timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """wait_until for code inside an event loop: polls without blocking the loop, so the cleanup
    it waits for (which runs on that loop) can make progress. The timeout is a bound, not a guess."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval_s)
    return predicate()


async def assert_no_leaks_async(*, allocator=None, agents=(), timeout_s: float = 10.0) -> None:
    if allocator is not None:
        assert await eventually(lambda: allocator.num_free_blocks == allocator.num_blocks, timeout_s), \
            f"leaked KV blocks: {allocator.num_blocks - allocator.num_free_blocks}"
    for agent in agents:
        assert await eventually(lambda: agent.num_active_transfers() == 0, timeout_s), \
            f"{agent.backend_name}: {agent.num_active_transfers()} transfers still tracked"


@pytest.fixture(scope="session")
def model_cache_dir() -> pathlib.Path:
    """Converted model weights are reused across tests and runs (conversion takes ~20 s)."""
    from pdserve.config import load_config

    # The same directory the worker processes use (PDSERVE_MODEL__CACHE_DIR moves both).
    path = load_config().model.cache_dir
    path.mkdir(parents=True, exist_ok=True)
    return path
