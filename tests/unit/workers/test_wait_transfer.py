"""Waiting for KV transfers from the worker's event loop: a transfer that ends is noticed at once,
however many others are still in flight. The wait used to block a default-executor thread per
transfer (6 of them on a 2-core host), so with more transfers in flight than threads a finished
one waited for an unfinished one's wait to time out."""
import asyncio
import concurrent.futures
import threading

import pytest

from pdserve.clock import WallClock
from pdserve.kvtransfer import TransferState
from pdserve.kvtransfer.base import TransferStatus
from pdserve.workers import prefill_side


class _End:
    def __init__(self, timeout_s: float = 3600.0):
        self.status = TransferStatus(WallClock(), timeout_s)

    def poll(self) -> TransferState:
        return self.status.poll()


def test_a_finished_transfer_is_not_stuck_behind_unfinished_ones(monkeypatch):
    # No periodic re-check could rescue a stuck wait within the test's time.
    monkeypatch.setattr(prefill_side, "_WAIT_SLICE_S", 3600.0)

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        unfinished, finished = _End(), _End()
        waiting = asyncio.ensure_future(prefill_side.wait_transfer(unfinished))
        try:
            await asyncio.sleep(0)              # its wait has started before the other one
            done = asyncio.ensure_future(prefill_side.wait_transfer(finished))
            await asyncio.sleep(0)
            # Ended from another thread, as a backend's own thread does.
            threading.Thread(target=finished.status.mark_done).start()
            assert await asyncio.wait_for(done, 30) is TransferState.DONE
            assert not waiting.done()
        finally:
            unfinished.status.mark_failed("test over")   # releases a blocked executor thread
        assert await asyncio.wait_for(waiting, 30) is TransferState.FAILED
    asyncio.run(main())


@pytest.mark.parametrize("ended_before_the_wait", [True, False])
def test_the_wait_returns_the_final_state(ended_before_the_wait):
    async def main():
        end = _End()
        if ended_before_the_wait:
            end.status.mark_failed("refused")
            return await prefill_side.wait_transfer(end)
        wait = asyncio.ensure_future(prefill_side.wait_transfer(end))
        await asyncio.sleep(0)
        end.status.mark_failed("refused")
        return await wait
    assert asyncio.run(main()) is TransferState.FAILED


def test_a_deadline_ends_the_wait_although_no_thread_ends_the_transfer(monkeypatch):
    monkeypatch.setattr(prefill_side, "_WAIT_SLICE_S", 0.01)
    assert asyncio.run(prefill_side.wait_transfer(_End(timeout_s=0.05))) is TransferState.FAILED
