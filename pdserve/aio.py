"""The event loop the long-running components run on.

uvloop when it is installed (it is a dependency on Linux and macOS): `pdserve bench gateway`
measured it cutting the per-request cost of every asyncio hop (HTTP parsing, both gRPC hops, the
stream relay). `PDSERVE_EVENT_LOOP=asyncio` falls back to the standard loop, for debugging or to
compare the two.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    if os.environ.get("PDSERVE_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:     # Windows, or an install without it
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
