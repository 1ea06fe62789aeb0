"""The event loop the long-running components run on, and waits with a time limit.

uvloop when it is installed (it is a dependency on Linux and macOS): `pdserve bench gateway`
measured it cutting the per-request cost of every asyncio hop (HTTP parsing, both gRPC hops, the
stream relay). `PDSERVE_EVENT_LOOP=asyncio` falls back to the standard loop, for debugging or to
compare the two.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Coroutine, TypeVar

T = TypeVar("T")


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    if os.environ.get("PDSERVE_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:     # Windows, or an install without it
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def within(aw: Awaitable[T], timeout_s: float) -> T:
    """`await aw`, raising TimeoutError after `timeout_s`. Not `asyncio.wait_for`: on Python 3.11 it
    returns the result, and drops the cancellation, when its task is cancelled just as `aw`
    completes. The router's relay waits like this for every token, so a client that went away
    mid-stream could leave its request decoding to max_tokens (seen in about 1 test run in 15)."""
    async with asyncio.timeout(timeout_s):
        return await aw
