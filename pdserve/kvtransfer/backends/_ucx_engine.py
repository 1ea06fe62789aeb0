"""The UCX agent's thread: one blocking loop that progresses the ucxx worker and steps every flow.

An asyncio loop ran this before, a coroutine per transfer: each post, completion and probe went
through futures and loop turns, most of the 0.9-1.1 ms a 1 MiB transfer took on a 2-vCPU host
where ucxx itself moves 1 MiB between two processes in 0.15 ms (`benchmarks/ucx_floor.py`). Here a flow is
a plain object whose `step()` looks at what UCX completed or delivered and posts what comes next;
the loop steps them after every progress, and sleeps in poll(2) on the worker's event descriptor
and a wake-up eventfd (with the GIL released) when none can move. No progress thread.

While a transfer is open the loop keeps progressing for `spin_s` after the last thing moved
before it sleeps: a transfer's messages come in bursts (a layer, the header, the trailer, the
acknowledgement), and waking a sleeping thread on a small VM took 50-100 us a time, a fifth of a
1 MiB transfer (`pdserve bench kv`). An idle agent never spins.
"""
from __future__ import annotations

import collections
import os
import select
import threading
import time

# The loop wakes at least this often while a transfer is open: its status can end from another
# thread (its deadline seen by a poll()) without a wake-up, and UCX documents no lost event but a
# transfer must never hang on one. An idle agent (only its inbox open) wakes at IDLE_TICK_S.
TICK_S = 0.05
IDLE_TICK_S = 0.1
DEFAULT_SPIN_S = 50e-6


class Pending:
    """A posted UCX request; `buf` (what it reads or writes) lives until UCX completes it, even
    when the flow that posted it has given up (a freed receive buffer corrupts the heap)."""

    __slots__ = ("request", "buf", "data", "done", "error")

    def __init__(self, request, buf, data=None):
        self.request, self.buf, self.data = request, buf, data    # data: what a receive filled
        self.done = False
        self.error: Exception | None = None

    def poll(self) -> bool:
        """Whether the request has completed (its error, if any, in `error`)."""
        if not self.done and self.request.completed:
            try:
                self.request.check_error()
            except Exception as exc:  # UCX errors surface as various exception types
                self.error = exc
            self.done = True
        return self.done


class UcxEngine:
    """Every method but `call_soon`, `wake` and `close` runs on the engine's thread, under `lock`."""

    def __init__(self, worker, spin_s: float = 0.0):
        self.worker = worker
        self._spin_s = spin_s
        self._commands: collections.deque = collections.deque()
        self._pending: list[Pending] = []
        self._flows: list = []
        self._sleeping = False
        self._closed = False
        self.turns = 0      # loop iterations: tests see that an idle agent sleeps, not spins
        # Held by whoever calls into UCX: this loop while it works (not while it sleeps), and a
        # sender's thread while it posts. UCX makes a thread-safe worker with a spinlock, and on
        # a small host a thread spinning on it while the holder was preempted burnt whole time
        # slices: 3-5 ms transfers, one in ten (`pdserve bench kv` p99). A lock that sleeps does not.
        self.lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        worker.init_blocking_progress_mode()
        self._poll = select.poll()
        self._poll.register(worker.epoll_file_descriptor, select.POLLIN)
        self._poll.register(self._wake_fd, select.POLLIN)

    # ---- any thread ----
    def call_soon(self, fn, *args) -> None:
        self._commands.append((fn, args))
        self.wake()

    def call_later_soon(self, fn, *args) -> None:
        """`fn(*args)` on the engine's next turn, without waking it for that alone: the caller
        wakes it shortly anyway (within a tick at the latest)."""
        self._commands.append((fn, args))

    def wake(self) -> None:
        # The loop publishes `_sleeping` before it looks at its commands one last time, and a
        # caller appends before it reads `_sleeping`: one of the two sees the other's write.
        if self._sleeping:
            os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        self.call_soon(self._stop)

    def set_spin_s(self, spin_s: float) -> None:
        self._spin_s = spin_s     # read once a turn; a plain attribute write is atomic

    # ---- engine thread ----
    def add(self, flow) -> None:
        self._flows.append(flow)

    def post(self, request, buf, data=None) -> Pending:
        return self.adopt(Pending(request, buf, data))

    def adopt(self, pending: Pending) -> Pending:
        """Completes `pending` from now on, keeping its buffer until then."""
        if not pending.done:
            self._pending.append(pending)
        return pending

    def run(self) -> None:
        last_moved_s = 0.0
        while not self._closed:
            self.turns += 1
            with self.lock:
                moved = self._run_commands()
                moved |= self._progress()
                moved |= self._step_flows()
                now_s = time.monotonic()
                if moved:
                    last_moved_s = now_s
                # The inbox is always open; any other flow is a transfer.
                spin = not moved and len(self._flows) > 1 and now_s - last_moved_s < self._spin_s
                idle = not (moved or spin or self._commands) and self.worker.arm()
            if idle:
                self._sleep()
        with self.lock:
            for flow in self._flows:
                flow.close()
        os.close(self._wake_fd)

    def _sleep(self) -> None:
        self._sleeping = True
        try:
            if not self._commands:
                self._poll.poll(max(0, int(self._timeout_s() * 1000) + 1))
        finally:
            self._sleeping = False
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _timeout_s(self) -> float:
        soonest_s = min((flow.wake_at_s() for flow in self._flows), default=float("inf"))
        return IDLE_TICK_S if soonest_s == float("inf") else min(soonest_s, TICK_S)

    def _run_commands(self) -> bool:
        if not self._commands:
            return False
        while self._commands:
            fn, args = self._commands.popleft()
            fn(*args)
        return True

    def _progress(self) -> bool:
        progressed = False
        while self.worker.progress():
            progressed = True
        if self._pending:
            still = [p for p in self._pending if not p.poll()]
            progressed |= len(still) < len(self._pending)
            self._pending = still
        return progressed

    def _step_flows(self) -> bool:
        moved = False
        now_s = time.monotonic()
        for flow in list(self._flows):
            moved |= flow.step(now_s)
            if flow.finished:
                self._flows.remove(flow)
                moved = True
        return moved

    def _stop(self) -> None:
        self._closed = True
