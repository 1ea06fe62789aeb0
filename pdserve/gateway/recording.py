"""A request's outcome, once it is known: Prometheus metrics at once, the store off the response
path (a database write must not add to every request's latency, and a store outage must not fail
requests that were already answered)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pdserve.gateway.generation import Outcome, Prepared
from pdserve.gateway.live_window import LiveWindow
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.store import Store
from pdserve.store.models import RequestRecord

log = logging.getLogger("pdserve.gateway")
CLIENT_CLOSED = 499     # nginx's code for a client that went away mid-response


@dataclass
class Attempt:
    """One HTTP request from arrival to its recorded outcome."""

    req_id: str
    endpoint: str
    started_s: float
    tenant: str = ""
    prepared: Prepared | None = None
    plan: object = None          # IC-Cache's plan when the routed model name was asked for


def _outcome(status: int) -> str:
    if status == 200:
        return "ok"
    if status == CLIENT_CLOSED:
        return "cancelled"
    if status in (429, 503):
        return "overloaded"
    return "client_error" if status < 500 else "failed"


class RequestRecorder:
    def __init__(self, store: Store, metrics: GatewayMetrics, window: LiveWindow | None = None, iccache=None):
        self._iccache = iccache
        self._store = store
        self._metrics = metrics
        self._window = window
        self.pending: set[asyncio.Task] = set()

    def record(self, attempt: Attempt, out: Outcome, status: int) -> None:
        latency_s = time.perf_counter() - attempt.started_s
        self._metrics.requests.labels(attempt.endpoint, str(status)).inc()
        if status == 200:
            self._metrics.e2e.observe(latency_s)
            self._metrics.tokens.labels("completion").inc(out.num_generated)
            self._metrics.tokens.labels("cached_prompt").inc(out.num_cached_tokens)
        if self._window is not None:
            self._window.record(status, out.ttft_s, latency_s, out.num_generated)
        outcome = _outcome(status)
        log.info("request %s finished: status=%d outcome=%s tokens=%d latency_ms=%.1f", attempt.req_id, status,
                 outcome, out.num_generated, latency_s * 1e3)
        p = attempt.prepared
        rec = RequestRecord(req_id=attempt.req_id, model=p.model if p else "", tenant=attempt.tenant,
                            endpoint=attempt.endpoint, num_prompt_tokens=len(p.prompt_ids) if p else 0,
                            num_completion_tokens=out.num_generated,
                            ttft_ms=out.ttft_s * 1e3 if out.ttft_s is not None else None,
                            latency_ms=latency_s * 1e3, outcome=outcome, status_code=status)
        self._background(asyncio.to_thread(self._store.record_request, rec))
        if attempt.plan is not None and status == 200 and self._iccache is not None:
            self._track(self._iccache.record_soon(p.response_id, attempt.plan, out.text, attempt.tenant))

    def _background(self, coro) -> None:
        self._track(asyncio.create_task(coro))

    def _track(self, task: asyncio.Task) -> None:
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not record a request: %s", task.exception())
