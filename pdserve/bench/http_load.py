"""A minimal HTTP/1.1 load generator for the benchmarks: keep-alive connections, JSON bodies with
Content-Length, responses read by Content-Length.

On a 2-core host the client shares the cores with the server it measures; httpx spent about
2 ms of CPU per request at 32 clients (`pdserve bench gateway` reports CPU per process), as much
as gateway and router together, and so lowered the throughput it was measuring. This client
costs a fraction of that, as wrk or oha would.
"""
from __future__ import annotations

import asyncio


class HttpStatusError(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


class KeepAliveClient:
    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post_json(self, path: str, body: bytes) -> bytes:
        """The response body of a 2xx; HttpStatusError otherwise (a 429 is an answer, not a failure).

        A server closes keep-alive connections left idle (uvicorn after 5 s: the benchmark's
        rounds leave the gateway's idle while the direct path runs). A closed idle connection is
        not reused, and a reused one that ends before any byte of the answer (closed as the
        request went out) is retried once on a new connection, as HTTP clients do; any other
        failure is the request's."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof():
                try:
                    return await self._exchange(reader, writer, path, body)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                except ConnectionResetError:
                    pass
                break
            writer.close()
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return await self._exchange(reader, writer, path, body)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                        body: bytes) -> bytes:
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % (path.encode(), self._host.encode(), len(body)) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, keep_alive = _parse_head(head)
            payload = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep_alive:
            self._idle.append((reader, writer))
        else:
            writer.close()
        if not 200 <= status < 300:
            raise HttpStatusError(status, payload)
        return payload

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if b"content-length" not in headers:
        raise ValueError("response without Content-Length (chunked responses are not supported)")
    return status, int(headers[b"content-length"]), headers.get(b"connection", b"").lower() != b"close"
