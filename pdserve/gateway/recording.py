"""A request's outcome, once it is known: Prometheus metrics at once, the store off the response
path (a database write must not add to every request's latency, and a store outage must not fail
requests that were already answered).

Records are written in batches (`RecordBatcher`): one transaction every `flush_interval_s` at
most, instead of a thread hand-off and a commit per request. `pdserve bench gateway` measured
the per-request write at about 1.5 ms of the gateway's CPU, most of its overhead at concurrency 1.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pdserve.gateway.generation import Outcome, Prepared
from pdserve.gateway.live_window import LiveWindow
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.store import Store
from pdserve.store.models import utcnow

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
        self._metrics = metrics
        self._window = window
        self.pending: set[asyncio.Task] = set()
        self.batcher = RecordBatcher(store, self._track)

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
        # One info line per request and process: a client's request id greps through every log.
        log.info("request %s finished: status=%d outcome=%s tokens=%d latency_ms=%.1f", attempt.req_id, status,
                 outcome, out.num_generated, latency_s * 1e3)
        p = attempt.prepared
        self.batcher.add({"req_id": attempt.req_id, "model": p.model if p else "", "tenant": attempt.tenant,
                          "endpoint": attempt.endpoint, "created_at": utcnow(),
                          "num_prompt_tokens": len(p.prompt_ids) if p else 0,
                          "num_completion_tokens": out.num_generated,
                          "ttft_ms": out.ttft_s * 1e3 if out.ttft_s is not None else None,
                          "latency_ms": latency_s * 1e3, "outcome": outcome, "status_code": status})
        if attempt.plan is not None and self._iccache is not None:
            if status == 200:
                self._track(self._iccache.record_soon(p.response_id, attempt.plan, out.text))
            else:
                self._iccache.forget(p.response_id)

    async def drain(self) -> None:
        """Writes what is buffered and waits for background writes (at shutdown)."""
        await self.batcher.flush()
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)

    def _track(self, task: asyncio.Task) -> None:
        self.pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not record a request: %s", task.exception())


class RecordBatcher:
    """Buffers request records and writes them in one transaction per flush, one flush at a time.

    A store outage costs records, never requests: a failed batch is retried row by row (so one
    bad row loses only itself) and what still fails is logged and counted in `num_lost`. The
    buffer is bounded; past `max_buffered` rows new ones are dropped and counted the same way."""

    def __init__(self, store: Store, track, flush_interval_s: float = 0.1, max_buffered: int = 50_000):
        self._store = store
        self._track = track
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self._rows: list[dict] = []
        self._flusher: asyncio.Task | None = None
        self.num_lost = 0

    def add(self, row: dict) -> None:
        if len(self._rows) >= self.max_buffered:
            self.num_lost += 1
            return
        self._rows.append(row)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())
            self._track(self._flusher)

    async def _flush_later(self) -> None:
        try:
            while self._rows:
                await asyncio.sleep(self.flush_interval_s)
                await self._write(self._take())
        finally:
            self._flusher = None

    async def flush(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._write(self._take())

    def _take(self) -> list[dict]:
        rows, self._rows = self._rows, []
        return rows

    async def _write(self, rows: list[dict]) -> None:
        if not rows:
            return
        try:
            await asyncio.to_thread(self._store.record_requests, rows)
            return
        except Exception as exc:   # noqa: BLE001 - any store failure: salvage row by row
            first_error = exc
        lost = 0
        for row in rows:
            try:
                await asyncio.to_thread(self._store.record_requests, [row])
            except Exception:   # noqa: BLE001
                lost += 1
        if lost:
            self.num_lost += lost
            log.error("could not record %d of %d requests: %s", lost, len(rows), first_error)
