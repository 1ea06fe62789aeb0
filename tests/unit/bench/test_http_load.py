"""The benchmarks' keep-alive client survives a server closing idle connections (uvicorn does
after 5 s), as HTTP clients do, and still reports a request that failed mid-answer."""
import asyncio

import pytest

from pdserve.bench.http_load import KeepAliveClient

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _request(reader) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(2)


async def _serve(ending: str, closed: asyncio.Queue):
    """Answers each connection's first request, then ends it: `idle` closes it at once (an idle
    timeout), `on_request` when the next request arrives (the timeout fired just then), `cut`
    answers that request only in part."""
    async def handle(reader, writer):
        await _request(reader)
        writer.write(_OK)
        await writer.drain()
        if ending != "idle":
            await reader.readuntil(b"\r\n\r\n")
        if ending == "cut":
            writer.write(_OK[:20])
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.put_nowait(None)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _run(ending: str, check) -> None:
    async def main():
        closed: asyncio.Queue = asyncio.Queue()
        server, port = await _serve(ending, closed)
        client = KeepAliveClient("127.0.0.1", port)
        try:
            assert await client.post_json("/x", b"{}") == b"ok"
            await check(client, closed)
        finally:
            await client.close()
            server.close()
    asyncio.run(main())


@pytest.mark.parametrize("ending", ["idle", "on_request"])
def test_a_connection_the_server_closed_is_not_a_failed_request(ending):
    async def check(client, closed):
        if ending == "idle":
            await closed.get()      # closed while idle in the client's pool
        assert await client.post_json("/x", b"{}") == b"ok"
        assert await client.post_json("/x", b"{}") == b"ok"
    _run(ending, check)


def test_an_answer_cut_short_is_still_an_error():
    async def check(client, closed):
        with pytest.raises(asyncio.IncompleteReadError):
            await client.post_json("/x", b"{}")
    _run("cut", check)
