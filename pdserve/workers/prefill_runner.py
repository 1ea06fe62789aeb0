"""The prefill worker's compute thread, driven by a pure scheduling policy through events.

Events: `submit()` (arrival; may ask the running unit to stop at its next operator boundary)
and operator/unit completion inside the loop. The loop asks the policy for the next unit only
when idle, after a unit completes, or after a preemption; it never polls on a timer. Finished
layers are handed to the job's `on_layer` callback at once (the KV sender), so layer-wise
transfer keeps going across preemptions. Times come from the injected clock.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pdserve.clock import Clock
from pdserve.policy.cost_model import CalibratedCostModel
from pdserve.policy.prefill_scheduler import BasePrefillScheduler, PrefillJob, WorkUnit
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.unit_execution import CachedPrefix, JobState, UnitExecution

log = logging.getLogger("pdserve.prefill")

LayerCallback = Callable[[int, torch.Tensor], None]


@dataclass
class _Pending:
    state: JobState
    on_layer: LayerCallback
    future: concurrent.futures.Future


class Rejected(Exception):
    """On-demand forwarding: this worker cannot meet the request's TTFT; try another one."""


@dataclass
class RunnerStats:
    preemption_latencies_s: list[float] = field(default_factory=list)
    # (op index % 2 -> 'attention'|'mlp', tokens in the unit, predicted s, measured s)
    operator_timings: list[tuple[str, int, float, float]] = field(default_factory=list)
    # Per finished unit: (predicted s of all its operators, measured s of all its operators)
    unit_timings: list[tuple[float, float]] = field(default_factory=list)
    num_units: int = 0
    num_rejected: int = 0
    num_abandoned: int = 0      # started units stopped because every request in them went away


class PrefillRunner:
    def __init__(self, model: LlamaModel, scheduler: BasePrefillScheduler, clock: Clock,
                 record_timings: bool = False, max_pending: int = 256):
        self.model = model
        self.max_pending = max_pending
        self._abandoned: set[str] = set()   # cancelled after their compute started
        self.scheduler = scheduler
        self.clock = clock
        self.stats = RunnerStats()
        self._record_timings = record_timings
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._executions: dict[int, UnitExecution] = {}   # preempted units keep their state here
        self._running: WorkUnit | None = None
        self._preempt_requested_s: float | None = None
        self._unit_totals: dict[int, list[float]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="prefill-compute", daemon=True)
        self._thread.start()

    def submit(self, req_id: str, token_ids: list[int], deadline_s: float, on_layer: LayerCallback,
               admission_deadline_s: float | None = None, prompt_top: int | None = None,
               prefix: CachedPrefix | None = None) -> concurrent.futures.Future:
        """Queue a prompt; the future resolves to its JobState (`logits`: the last position's;
        `prompt_logprobs` when `prompt_top` asks for them). `prefix`: buffers holding the KV of the
        prompt's first C tokens; only the rest is computed (and costed, with its attention over
        the prefix).

        Refuses at once (Rejected) when `max_pending` prompts are already here, and, given an
        `admission_deadline_s`, a prompt the policy predicts cannot finish by then: the router
        offers it to another worker or answers 429 instead of letting it wait without bound.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if req_id in self._pending:
                raise ValueError(f"request {req_id} is already being prefilled")
            if len(self._pending) >= self.max_pending:
                self.stats.num_rejected += 1
                raise Rejected(f"{len(self._pending)} prompts are already queued here, the limit")
            now = self.clock.now_s()
            cached = 0 if prefix is None else prefix.num_tokens
            job = PrefillJob(req_id, len(token_ids), now, deadline_s, cached_tokens=cached)
            if admission_deadline_s is not None:
                self._admit(PrefillJob(req_id, len(token_ids), now, admission_deadline_s, cached_tokens=cached), now)
            state = JobState(req_id, list(token_ids), prompt_top=prompt_top)
            if prefix is not None:
                state.seed(prefix)
            self._pending[req_id] = _Pending(state, on_layer, future)
            preempt = self.scheduler.add(job, now)
            if preempt and self._running is not None and self._preempt_requested_s is None:
                self._preempt_requested_s = now
            self._cond.notify()
        return future

    def cancel(self, req_id: str) -> bool:
        """A prompt whose client went away: dropped from the queue if it has not started, else its
        unit stops at the next operator boundary once every request in it went away (a batch
        with a live member runs on; the result is dropped). False if the prompt is unknown."""
        with self._cond:
            running = self._running is not None and req_id in self._running.req_ids
            if running or not self.scheduler.remove(req_id):
                if req_id not in self._pending:
                    return False
                self._abandoned.add(req_id)
                return True
            pending = self._pending.pop(req_id, None)
        if pending is not None:
            pending.future.cancel()
        return True

    def _abandon_if_cancelled(self, unit: WorkUnit) -> bool:
        with self._cond:
            if not self._abandoned.issuperset(unit.req_ids):
                return False
            self.scheduler.on_abandoned(unit, self.clock.now_s())
            for req_id in unit.req_ids:
                self._abandoned.discard(req_id)
                pending = self._pending.pop(req_id, None)
                if pending is not None:
                    pending.future.cancel()
            self._running = None
            self.stats.num_abandoned += 1
        log.info("prefill of %s stopped at operator %d/%d: its client went away", unit.req_ids, unit.next_op,
                 unit.num_ops)
        return True

    def _admit(self, job: PrefillJob, now: float) -> None:
        accept, finish_s = self.scheduler.admission(job, now)
        if not accept:
            self.stats.num_rejected += 1
            raise Rejected(f"predicted TTFT {1e3 * finish_s:.0f} ms exceeds the budget of "
                           f"{1e3 * (job.deadline_s - now):.0f} ms")

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _next_unit(self) -> WorkUnit | None:
        with self._cond:
            while not self._stopped:
                unit = self.scheduler.next_unit(self.clock.now_s())
                if unit is not None:
                    self._running, self._preempt_requested_s = unit, None
                    return unit
                self._cond.wait()
        return None

    def _loop(self) -> None:
        while (unit := self._next_unit()) is not None:
            try:
                self._run_unit(unit)
            except Exception as exc:   # a model failure fails this unit's requests, not the worker
                log.exception("prefill unit failed")
                self._fail_unit(unit, exc)

    def _run_unit(self, unit: WorkUnit) -> None:
        execution = self._executions.pop(id(unit), None)
        if execution is None:
            with self._cond:
                states = {p.job.req_id: self._pending[p.job.req_id].state for p in unit.pieces}
            execution = UnitExecution(self.model, unit, states)
        while True:
            if self._abandon_if_cancelled(unit):
                return
            started = time.perf_counter()
            ready = execution.run_operator()
            self._record(unit, time.perf_counter() - started)
            for event in ready:
                if event.req_id not in self._abandoned:     # its KV sender is already gone
                    self._pending[event.req_id].on_layer(event.layer, event.kv)
            with self._cond:
                now = self.clock.now_s()
                self.scheduler.on_operator_done(unit, now)
                if unit.finished:
                    self._complete(self.scheduler.on_unit_done(unit, now))
                    self._running = None
                    self.stats.num_units += 1
                    return
                if self._preempt_requested_s is not None:
                    self.stats.preemption_latencies_s.append(now - self._preempt_requested_s)
                    self.scheduler.on_preempted(unit, now)
                    self._executions[id(unit)] = execution
                    self._running = None
                    return

    def _record(self, unit: WorkUnit, measured_s: float) -> None:
        cost = self.scheduler.cost_model
        if cost is None:
            return
        if self._record_timings:    # the prediction made before this measurement is folded in
            kind = "attention" if unit.next_op % 2 == 0 else "mlp"
            predicted = cost.op_s(unit.next_op, unit.piece_tokens(), unit.piece_past())
            self.stats.operator_timings.append((kind, sum(unit.piece_tokens()), predicted, measured_s))
            if unit.next_op == 0:
                self._unit_totals[id(unit)] = [cost.remaining_s(unit.piece_tokens(), 0, unit.piece_past()), 0.0]
            totals = self._unit_totals.get(id(unit))
            if totals is not None:
                totals[1] += measured_s
                if unit.next_op == unit.num_ops - 1:
                    self.stats.unit_timings.append(tuple(self._unit_totals.pop(id(unit))))
        if isinstance(cost, CalibratedCostModel):
            with self._cond:
                cost.observe(unit.next_op, unit.piece_tokens(), measured_s, unit.piece_past())

    def _complete(self, jobs: list[PrefillJob]) -> None:
        for job in jobs:
            self._abandoned.discard(job.req_id)
            pending = self._pending.pop(job.req_id)
            pending.future.set_result(pending.state)

    def _fail_unit(self, unit: WorkUnit, exc: Exception) -> None:
        with self._cond:
            for p in unit.pieces:
                self._abandoned.discard(p.job.req_id)
                pending = self._pending.pop(p.job.req_id, None)
                if pending is not None and not pending.future.done():
                    pending.future.set_exception(exc)
            self._running = None
