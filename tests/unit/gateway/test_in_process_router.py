"""The embedded router's call object behaves as a gRPC server-streaming call does: chunks then
EOF, the handler's abort as AioRpcError with its code, cancel() cancels the handler (so the router
frees the worker's KV), and a reader never hangs, however early the call is cancelled. The real
router behind it is exercised in tests/integration/test_embedded_router.py."""
import asyncio

import grpc
import pytest

from pdserve.gateway.router_client import InProcessRouter, LocalCall, _Context


def run(coro):
    return asyncio.run(coro)


async def _stream(chunks, abort=None, context=None):
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk
    if abort is not None:
        await (context or _Context()).abort(*abort)


def test_chunks_then_eof_and_eof_again():
    async def main():
        call = LocalCall(_stream(["a", "b"]))
        got = [await call.read(), await call.read()]
        assert await call.read() is grpc.aio.EOF and await call.read() is grpc.aio.EOF
        assert [c async for c in LocalCall(_stream(["x", "y", "z"]))] == ["x", "y", "z"]
        return got
    assert run(main()) == ["a", "b"]


def test_an_abort_arrives_after_the_chunks_as_the_rpc_error():
    async def main():
        call = LocalCall(_stream(["a"], abort=(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")))
        assert await call.read() == "a"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details() == "full"
        with pytest.raises(grpc.aio.AioRpcError):     # stays failed, as a finished gRPC call does
            await call.read()
    run(main())


def test_a_handler_bug_is_unknown_not_a_crash_of_the_reader():
    async def broken():
        yield "a"
        raise KeyError("oops")

    async def main():
        call = LocalCall(broken())
        assert await call.read() == "a"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() is grpc.StatusCode.UNKNOWN and "KeyError" in err.value.details()
    run(main())


def test_cancel_reaches_the_handler_and_the_reader_sees_cancelled():
    async def main():
        started, cleaned = asyncio.Event(), asyncio.Event()
        seen = []

        async def handler():
            try:
                yield "first"
                started.set()
                await asyncio.Event().wait()      # a decode that would run on
                yield "never"
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                cleaned.set()                     # the router frees the worker's KV here

        call = LocalCall(handler())
        assert await call.read() == "first"
        await started.wait()
        assert call.cancel()
        await cleaned.wait()
        await asyncio.sleep(0)                    # the task's own end follows its clean-up
        assert seen == ["cancelled"] and call.done() and not call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() is grpc.StatusCode.CANCELLED
    run(main())


def test_a_call_cancelled_before_its_handler_ran_does_not_hang_its_reader():
    async def main():
        call = LocalCall(_stream(["a"]))
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() is grpc.StatusCode.CANCELLED
    run(main())


def test_errors_map_to_the_same_http_statuses_as_the_grpc_client():
    router = InProcessRouter(service=None, retry_after_s=2)
    for code, status in ((grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                         (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
                         (grpc.StatusCode.INTERNAL, 500)):
        exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "why")
        assert router.to_http(exc).status == status
