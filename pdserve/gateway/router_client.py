"""The gateway's view of the router: a token stream per request, gRPC errors mapped to HTTP.

`RouterClient` calls a router process over gRPC. `InProcessRouter` calls the router's service in
this process (gateway.embedded_router): the same stream object and the same status codes, one
serialisation and one network hop fewer per request. Its call runs the service's handler in a
task, as the gRPC server would, so cancelling it cancels the handler (freeing the worker's KV)."""
from __future__ import annotations

import asyncio

import grpc

from pdserve import rpc
from pdserve.cluster_auth import Credential
from pdserve.gateway.errors import OpenAIError, bad_request, overloaded
from pdserve.v1 import router_pb2, router_pb2_grpc


class _RouterErrors:
    def __init__(self, retry_after_s: int):
        self._retry_after_s = retry_after_s

    def to_http(self, exc: grpc.aio.AioRpcError) -> OpenAIError:
        code, details = exc.code(), exc.details() or ""
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(details)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return overloaded(429, f"The server is at capacity: {details}", self._retry_after_s)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
            return overloaded(503, f"Service unavailable, retry later: {details}", self._retry_after_s)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return OpenAIError(504, details, "timeout", code="timeout")
        return OpenAIError(500, f"internal error: {code.name}: {details}", "server_error")

    async def list_workers(self, timeout_s: float = 2.0) -> list[router_pb2.WorkerStatus]:
        return list((await self.list_workers_response(timeout_s)).workers)


class RouterClient(_RouterErrors):
    def __init__(self, address: str, retry_after_s: int, credential: Credential | None = None):
        super().__init__(retry_after_s)
        self._channel = rpc.channel(address, credential)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def generate(self, request: router_pb2.RouteRequest):
        return self._stub.Generate(request)

    async def list_workers_response(self, timeout_s: float = 2.0) -> router_pb2.ListWorkersResponse:
        return await self._stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=timeout_s)


class InProcessRouter(_RouterErrors):
    """`service`: a RouterService (its Generate and ListWorkers handlers)."""

    def __init__(self, service, retry_after_s: int):
        super().__init__(retry_after_s)
        self._service = service

    async def close(self) -> None:
        pass

    def generate(self, request: router_pb2.RouteRequest) -> "LocalCall":
        return LocalCall(self._service.Generate(request, _Context()))

    async def list_workers_response(self, timeout_s: float = 2.0) -> router_pb2.ListWorkersResponse:
        return await self._service.ListWorkers(router_pb2.ListWorkersRequest(), _Context())


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Context:
    """What the router's handlers use of a gRPC servicer context."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise rpc_error(code, details)


class LocalCall:
    """A server-streaming call served in this process: read() returns chunks, then grpc.aio.EOF;
    the handler's abort (or a crash) arrives as the AioRpcError a remote call would raise. Chunks
    are queued unbounded: a stream holds at most max_tokens small chunks."""

    def __init__(self, handler):
        self._items: asyncio.Queue = asyncio.Queue()
        self._end: object = None          # grpc.aio.EOF or the AioRpcError, once the handler ended
        self._ended = False               # the reader has reached the end
        self._task = asyncio.ensure_future(self._pump(handler))
        # The end is queued when the task ends, however it ends: also when it is cancelled
        # before its first step, where the coroutine itself never runs.
        self._task.add_done_callback(self._finished)

    async def _pump(self, handler) -> None:
        try:
            async for chunk in handler:
                self._items.put_nowait(chunk)
            self._end = grpc.aio.EOF
        except grpc.aio.AioRpcError as exc:
            self._end = exc
        except Exception as exc:   # noqa: BLE001 - a handler bug: what gRPC reports as UNKNOWN
            self._end = rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")

    def _finished(self, task: asyncio.Task) -> None:
        if self._end is None:
            self._end = rpc_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        self._items.put_nowait(_END)

    async def read(self):
        if not self._ended:
            item = await self._items.get()
            if item is not _END:
                return item
            self._ended = True
        if isinstance(self._end, grpc.aio.AioRpcError):
            raise self._end
        return grpc.aio.EOF

    def cancel(self) -> bool:
        if self._task.done():
            return False
        self._task.cancel()
        return True

    def done(self) -> bool:
        return self._task.done()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while (chunk := await self.read()) is not grpc.aio.EOF:
            yield chunk


_END = object()
