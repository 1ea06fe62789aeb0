"""Request records leave the response path in batches: every record reaches the store (SQLite,
for real), one bad row loses only itself, a store outage is counted instead of raised, and the
buffer is bounded."""
import asyncio

from pdserve.gateway.recording import RecordBatcher
from pdserve.store import Store
from pdserve.store.models import utcnow


def _row(req_id: str) -> dict:
    return {"req_id": req_id, "model": "tiny", "tenant": "", "endpoint": "completions", "created_at": utcnow(),
            "num_prompt_tokens": 3, "num_completion_tokens": 1, "ttft_ms": 1.0, "latency_ms": 2.0,
            "outcome": "ok", "status_code": 200}


def _batcher(store, **kwargs) -> tuple[RecordBatcher, set]:
    pending: set = set()

    def track(task):
        pending.add(task)
        task.add_done_callback(pending.discard)
    return RecordBatcher(store, track, flush_interval_s=0.01, **kwargs), pending


def test_records_reach_a_real_store_in_batches(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/r.db")
    store.migrate()

    async def main():
        batcher, pending = _batcher(store)
        for i in range(50):
            batcher.add(_row(f"r{i}"))
        while pending:                   # the flush scheduled by the first add
            await asyncio.gather(*list(pending))
        batcher.add(_row("late"))
        await batcher.flush()
        return batcher.num_lost
    assert asyncio.run(main()) == 0
    assert store.count_requests("ok") == 51 and store.get_request("late").num_prompt_tokens == 3


class _Flaky:
    """A store that refuses any batch holding a 'bad' row, or everything while down."""

    def __init__(self):
        self.rows: list[str] = []
        self.down = False

    def record_requests(self, rows):
        if self.down or any(r["req_id"] == "bad" for r in rows):
            raise RuntimeError("constraint violated" if not self.down else "database unreachable")
        self.rows += [r["req_id"] for r in rows]


def test_a_bad_row_loses_only_itself_and_an_outage_is_counted_not_raised():
    store = _Flaky()

    async def main():
        batcher, _ = _batcher(store)
        for req_id in ("a", "bad", "b"):
            batcher.add(_row(req_id))
        await batcher.flush()
        assert store.rows == ["a", "b"] and batcher.num_lost == 1
        store.down = True
        batcher.add(_row("c"))
        await batcher.flush()
        assert batcher.num_lost == 2
    asyncio.run(main())


def test_the_buffer_is_bounded():
    store = _Flaky()

    async def main():
        batcher, _ = _batcher(store, max_buffered=3)
        for i in range(5):
            batcher.add(_row(f"r{i}"))
        await batcher.flush()
        return batcher.num_lost
    assert asyncio.run(main()) == 2 and store.rows == ["r0", "r1", "r2"]
