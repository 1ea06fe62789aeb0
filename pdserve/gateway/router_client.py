"""The gateway's view of the router: a token stream per request, gRPC errors mapped to HTTP."""
from __future__ import annotations

import grpc

from pdserve import rpc
from pdserve.cluster_auth import Credential
from pdserve.gateway.errors import OpenAIError, bad_request, overloaded
from pdserve.v1 import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(self, address: str, retry_after_s: int, credential: Credential | None = None):
        self._channel = rpc.channel(address, credential)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._retry_after_s = retry_after_s

    async def close(self) -> None:
        await self._channel.close()

    def generate(self, request: router_pb2.RouteRequest):
        return self._stub.Generate(request)

    async def list_workers(self, timeout_s: float = 2.0) -> list[router_pb2.WorkerStatus]:
        return list((await self.list_workers_response(timeout_s)).workers)

    async def list_workers_response(self, timeout_s: float = 2.0) -> router_pb2.ListWorkersResponse:
        return await self._stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=timeout_s)

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
