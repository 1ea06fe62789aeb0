"""Progress of the UCX worker on the agent's event loop, woken by the worker's event descriptor.

ucxx's default progress thread hands every request across threads: a post waits for the thread
to submit it (delayed submission) and a completion waits for the thread to notice it, which
sleeps up to a millisecond in epoll when idle. Small transfers paid several such hand-offs on
each side, 2-6 ms for 1 MiB (`pdserve bench kv`). Here the loop that posts requests also
progresses them: it sleeps in epoll on the worker's descriptor beside its other sockets, and
progresses when UCX signals an event or right after a post. An idle agent costs no CPU, and
nothing spins while a transfer waits for its peer.
"""
from __future__ import annotations

import asyncio

# Guard against a lost wake-up (UCX documents none, but a transfer must never hang on one):
# an idle agent progresses at this period whatever its descriptor says.
SAFETY_PROGRESS_S = 0.1


class UcxProgress:
    """Owns the progress of one ucxx worker; every method runs on the agent's loop thread."""

    def __init__(self, worker, loop: asyncio.AbstractEventLoop):
        self._worker = worker
        self._loop = loop
        # Request -> (future, the buffer it reads or writes): the buffer lives until UCX completes
        # the request, even when its waiter gave up (a freed receive buffer corrupts the heap).
        self._requests: dict[object, tuple[asyncio.Future, object]] = {}
        self._event_waiters: list[asyncio.Future] = []
        self._progress_due = False
        worker.init_blocking_progress_mode()
        loop.add_reader(worker.epoll_file_descriptor, self._on_event)
        self._safety = loop.create_task(self._safety_progress())
        self.progress()

    def wait(self, request, buf) -> asyncio.Future:
        """A future that ends with `request` (its error raised); `buf` is kept until then."""
        future = self._loop.create_future()
        future.add_done_callback(_retrieve)
        self._requests[request] = (future, buf)
        self._progress_soon()
        return future

    async def next_event(self, timeout_s: float) -> None:
        """Until UCX next delivers something (a message to probe for may have come) or
        `timeout_s` passes: how a probing flow waits without polling."""
        waiter = self._loop.create_future()
        self._event_waiters.append(waiter)
        await asyncio.wait({waiter}, timeout=timeout_s)

    def progress(self) -> None:
        """Progress until UCX has nothing left, then re-arm the descriptor. Arming fails while
        events are pending, which are progressed first (ucp_worker_arm's contract)."""
        progressed = False
        while True:
            while self._worker.progress():
                progressed = True
            self._complete()
            if self._worker.arm():
                break
            progressed = True
        if progressed:
            self._wake_waiters()

    def _progress_soon(self) -> None:
        """One progress after the current step, however many requests it posts: a transfer's
        messages are posted back to back, and each progress-and-arm costs system calls."""
        if not self._progress_due:
            self._progress_due = True
            self._loop.call_soon(self._deferred_progress)

    def _deferred_progress(self) -> None:
        self._progress_due = False
        self.progress()

    def close(self) -> None:
        self._loop.remove_reader(self._worker.epoll_file_descriptor)
        self._safety.cancel()

    def _on_event(self) -> None:
        self.progress()
        self._wake_waiters()

    def _complete(self) -> None:
        done = [r for r in self._requests if r.completed]
        for request in done:
            future, _ = self._requests.pop(request)
            if future.done():
                continue
            try:
                request.check_error()
            except Exception as exc:  # UCX errors surface as various exception types
                future.set_exception(exc)
            else:
                future.set_result(None)

    def _wake_waiters(self) -> None:
        waiters, self._event_waiters = self._event_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _safety_progress(self) -> None:
        while True:
            await asyncio.sleep(SAFETY_PROGRESS_S)
            self._on_event()


def _retrieve(future: asyncio.Future) -> None:
    """Nobody may await a request its transfer gave up on; its error is not an unhandled one."""
    if not future.cancelled():
        future.exception()
