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
def empty_store(request, tmp_path):
    """A store on an empty database (no schema yet)."""
    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'pdserve.db'}")
        return
    if not _pg_up():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    schema = f"t_{uuid.uuid4().hex[:12]}"     # isolated schema per test, dropped afterwards
    admin = Store(PG_URL)
    with admin.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    s = Store(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        yield s
    finally:
        s.engine.dispose()
        with admin.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.engine.dispose()


@pytest.fixture
def store(empty_store):
    empty_store.migrate()
    return empty_store


def test_examples_cached_before_tenants_were_kept_belong_to_the_keyless_tenant(empty_store):
    from alembic import command
    from alembic.config import Config
    from pdserve.store import repository
    from pdserve.store.iccache import ICCacheRepository
    cfg = Config()
    cfg.set_main_option("script_location", str(repository._MIGRATIONS))
    with empty_store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.execute(text("INSERT INTO iccache_examples (request_text, answer_text, model, embedding, created_unix_s, "
                          "value, value_at_unix_s, num_uses, num_successes, quality, num_ratings, num_replays) "
                          "VALUES ('q', 'a', 'm', :e, 1, 0, 1, 0, 0, 0.5, 0, 0)"), {"e": b"\0" * 4})
    empty_store.migrate()
    (example,) = ICCacheRepository(empty_store).examples()
    assert (example.request_text, example.tenant) == ("q", "")


def test_migration_creates_schema_and_is_idempotent(store):
    store.migrate()
    tables = set(inspect(store.engine).get_table_names())
    assert {"api_keys", "scenarios", "worker_events", "request_records", "ratio_changes", "ratio_pins",
            "worker_drains", "alembic_version"} <= tables


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


def test_operator_state_survives_in_the_store(store):
    """What a restarted router reads back: pins, drains, and when each ratio last changed."""
    store.set_pin("chat", (2, 6))
    store.set_pin("code", (1, 1))
    store.set_pin("code", None)                      # unpinned
    store.set_pin("chat", (3, 5))                    # re-pinned: the newest wins
    store.set_drained("w1", True)
    store.set_drained("w2", True)
    store.set_drained("w2", False)
    store.add_ratio_change("chat", (2, 6), (3, 5), "set by an operator", {})
    assert store.pins() == {"chat": (3, 5)}
    assert store.drained_workers() == {"w1"}
    at = store.last_ratio_change_at()
    assert set(at) == {"chat"} and at["chat"].tzinfo is not None


def test_restored_state_pins_and_keeps_the_cooldown():
    import datetime as dt

    from pdserve.policy.ratio_controller import ControllerConfig, RatioController
    from pdserve.router.state import OperatorState, apply_operator_state

    controller = RatioController(ControllerConfig(cooldown_s=30.0))
    ten_s_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=10)
    apply_operator_state(OperatorState({"chat": (3, 5)}, {"w1"}, {"chat": ten_s_ago}), controller, now_s=1000.0)
    assert controller.pinned("chat") == (3, 5)
    # The change 10 s ago lands at ~990 s on the controller's clock: 20 s of cooldown are left.
    assert 989.0 < controller.last_change_s("chat") < 991.0


def test_iccache_migration_matches_the_models(store):
    """The IC-Cache tables exist as the models describe them (no autogenerate diff). (api_keys
    differs in form only: the migration made one unique index where the model declares a unique
    column plus an index.)"""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from pdserve.store.models import Base
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    def table(d):
        item = d[0] if isinstance(d, list) else d     # column changes come as lists of tuples
        for part in item[1:]:
            name = getattr(part, "name", None) if not isinstance(part, str) else part
            if hasattr(part, "table"):
                return part.table.name
            if name:
                return name
        return ""
    assert [d for d in diff if table(d).startswith("iccache")] == []


def test_iccache_rows_round_trip_and_a_rating_counts_once(store):
    import numpy as np

    from pdserve.store.iccache import ICCacheRepository
    from pdserve.store.models import ICExample, ICOffload
    repo = ICCacheRepository(store)
    vec = np.arange(4, dtype=np.float32)
    eid = repo.add_example(ICExample(request_text="q", answer_text="a", model="large", embedding=vec.tobytes(),
                                     created_unix_s=1.0, value=0.5, value_at_unix_s=1.0, num_uses=0,
                                     num_successes=0, quality=0.5, num_ratings=0, num_replays=0))
    repo.update_examples([{"id": eid, "num_uses": 3, "answer_text": "better"}])
    (row,) = repo.examples()
    assert (row.num_uses, row.answer_text) == (3, "better")
    assert np.array_equal(np.frombuffer(row.embedding, dtype=np.float32), vec)
    repo.record_answer(ICOffload(response_id="r1", arm="small", model="tiny", tenant="acme", chosen=[[eid, 0.9, 0.7]],
                                 context=[1.0, 0.9], request_text="q", answer_text="a", example_id=None))
    assert repo.rate("r1", 1.0, tenant="other") == (None, False)     # another tenant's answer: unknown
    assert repo.answer("r1", tenant="other") is None and repo.answer("r1", tenant="acme") is not None
    first = repo.rate("r1", 1.0, tenant="acme")
    again = repo.rate("r1", 0.0, tenant="acme")
    assert first[1] is True and again[1] is False and again[0].chosen == [[eid, 0.9, 0.7]]
    assert repo.rate("nope", 1.0) == (None, False)
    repo.delete_examples([eid])
    assert repo.num_examples() == 0
