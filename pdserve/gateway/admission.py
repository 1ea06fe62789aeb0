"""Load shedding and client-disconnect handling at the edge.

`InflightLimit`: more than `limit` completions at once get 429 with Retry-After at once, so
overload costs a client one round trip instead of a growing queue (and bounds the gateway's
memory). `unless_client_leaves`: a request whose response has not started (non-streamed ones
throughout, streamed ones until their first token) is watched for the client closing its
connection; the work is then cancelled, which cancels the router call and frees the worker's KV.
Once a stream is running, a failed write to the closed socket ends it instead.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

from pdserve.gateway.errors import overloaded

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before the response started."""


class InflightLimit:
    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.num_inflight = 0

    def acquire(self) -> None:
        """Raises a 429 OpenAIError when full; every successful call needs one `release()`."""
        if self.num_inflight >= self.limit:
            raise overloaded(429, f"The server is at capacity: {self.num_inflight} requests in flight",
                             self.retry_after_s)
        self.num_inflight += 1

    def release(self) -> None:
        self.num_inflight -= 1


async def _disconnected(request: Request) -> None:
    # The body has been read: the next ASGI message a server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):   # its outcome no longer reaches anyone
        pass
    raise ClientGone()
