"""The repository against real databases: a SQLite file, and PostgreSQL when one is running."""
import socket
import uuid

import pytest
from sqlalchemy import inspect, text

from pdserve.store import Store
from pdserve.store.models import RequestRecord

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'pdserve.db'}")
        s.migrate()
        yield s
        return
    if not _pg_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    schema = f"t_{uuid.uuid4().hex[:12]}"     # isolated schema per test, dropped afterwards
    admin = Store(PG_URL)
    with admin.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    s = Store(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        s.migrate()
        yield s
    finally:
        s.engine.dispose()
        with admin.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.engine.dispose()


def test_migration_creates_schema_and_is_idempotent(store):
    store.migrate()
    tables = set(inspect(store.engine).get_table_names())
    assert {"api_keys", "scenarios", "worker_events", "request_records", "ratio_changes", "alembic_version"} <= tables


def test_api_keys_are_stored_hashed_and_revocable(store):
    key = store.create_api_key("alice", tenant="acme")
    assert store.verify_api_key(key).tenant == "acme"
    assert store.verify_api_key(key + "x") is None
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT key_hash FROM api_keys")).scalar()
    assert key not in stored and len(stored) == 64
    assert store.revoke_api_key("alice") and store.verify_api_key(key) is None


def test_scenarios_requests_and_worker_history(store):
    store.upsert_scenario("chat", {"header": "chat"}, 500.0, 50.0)
    store.upsert_scenario("chat", {"header": "chat2"}, 400.0, 40.0)
    [sc] = store.list_scenarios()
    assert sc.match_rules == {"header": "chat2"} and sc.ttft_slo_ms == 400.0
    store.record_request(RequestRecord(req_id="r1", model="tiny", endpoint="chat", num_prompt_tokens=5,
                                       num_completion_tokens=3, ttft_ms=12.5, latency_ms=40.0, outcome="ok"))
    assert store.get_request("r1").num_completion_tokens == 3 and store.count_requests("ok") == 1
    store.record_worker_event("w1", "decode", "registered")
    store.record_worker_event("w1", "decode", "dead", "missed lease")
    assert [e.event for e in store.worker_events("w1")] == ["registered", "dead"]


def test_scenario_crud_and_ratio_history(store):
    store.upsert_scenario("code", {"tenants": ["acme"]}, 800.0, 60.0)
    assert store.get_scenario("code").match_rules == {"tenants": ["acme"]}
    store.add_ratio_change("code", (2, 2), (3, 1), "prefill-heavy", {"arrival_rps": 3.5})
    store.add_ratio_change("code", (3, 1), (2, 2), "decode-heavy", {})
    assert [(c.new_prefill, c.reason) for c in store.ratio_history("code")] == [(2, "decode-heavy"), (3, "prefill-heavy")]
    assert store.delete_scenario("code") and store.get_scenario("code") is None and not store.delete_scenario("code")
