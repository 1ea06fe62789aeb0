"""The decode worker's loop: step the engine while it has work, hand each step's deltas to the
streams, and learn what a step costs (for the router's decode model).

The loop sleeps while there is nothing to step and is woken by `wake()` (a new sequence in the
batch, a release that lets a preempted one back in); it re-checks at least every `IDLE_WAIT_S`.

`pause_file` is a fault hook (`diagnostics.decode_pause_file`): while that file exists the loop
takes no step, so requests stay in flight after their first token (which comes with the prefill's
KV and needs no step) for exactly as long as a test wants, instead of for as long as a stopped
process or a slow step happens to last.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from pdserve.aio import within
from pdserve.clock import Clock
from pdserve.policy.online_fit import OnlineLinearFit
from pdserve.workers.engine import Engine
from pdserve.workers.output import Delta, Finish

log = logging.getLogger("pdserve.worker")

IDLE_WAIT_S = 0.5           # re-check for work at least this often
_PAUSE_POLL_S = 0.01        # only while paused by the fault hook


class DecodeLoop:
    def __init__(self, engine: Engine, run_compute: Callable[..., Awaitable], clock: Clock,
                 deliver: Callable[[str, Delta], None], pause_file: str = ""):
        self.engine = engine
        self._run = run_compute
        self.clock = clock
        self._deliver = deliver
        self._pause_file = pause_file
        self.fit = OnlineLinearFit()    # seconds between step starts against batch size
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        last = None   # (start time, batch size) of the previous step while the loop stayed busy
        while True:
            if not self.engine.has_work:
                last = None
                await self._idle_wait()
                continue
            if self.paused():
                last = None
                await asyncio.sleep(_PAUSE_POLL_S)
                continue
            now = self.clock.now_s()
            if last is not None:
                # The interval between step starts is what a token costs in service: compute plus
                # streaming the previous step's tokens out.
                self.fit.add(last[1], now - last[0])
            last = (now, len(self.engine.running))
            for req_id, delta in (await self._step()).items():
                self._deliver(req_id, delta)
            if not self.engine.running:
                # Only preempted sequences are left and none fit yet: wait for a release (or a new
                # sequence) instead of spinning on empty steps.
                last = None
                await self._idle_wait()

    def paused(self) -> bool:
        return bool(self._pause_file) and os.path.exists(self._pause_file)

    async def _step(self) -> dict[str, Delta]:
        try:
            return await self._run(self.engine.step)
        except Exception:
            # A model failure (not a full pool: the scheduler preempts instead) ends this batch;
            # each stream's release frees its KV.
            log.exception("decode step failed; aborting the batch")
            return {r: Delta([], "", Finish.ABORT) for r in await self._run(self.engine.stop_all)}

    async def _idle_wait(self) -> None:
        self._wakeup.clear()
        try:
            await within(self._wakeup.wait(), IDLE_WAIT_S)
        except asyncio.TimeoutError:
            pass
