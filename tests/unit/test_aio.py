"""`within`: a time limit that never loses a cancellation."""
import asyncio

import pytest

from pdserve.aio import within


def test_a_cancellation_that_arrives_as_the_wait_completes_is_kept():
    async def body():
        done = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(done, 10))
        await asyncio.sleep(0)
        done.set_result("late")     # asyncio.wait_for on Python 3.11 would return "late"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(body())


def test_a_wait_past_its_limit_raises_timeout_and_an_early_one_returns():
    async def body():
        with pytest.raises(TimeoutError):
            await within(asyncio.get_running_loop().create_future(), 0.01)    # never completes
        assert await within(asyncio.sleep(0, "ok"), 10) == "ok"
    asyncio.run(body())
