"""Repository over the ORM; the only module that opens sessions. Blocking calls: async callers
run them in a thread."""
from __future__ import annotations

import datetime as dt
import hashlib
import pathlib
import secrets
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, delete, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from pdserve.store.models import (ApiKey, RatioChange, RatioPin, RequestRecord, Scenario, WorkerDrain,
                                  WorkerEvent)

_MIGRATIONS = pathlib.Path(__file__).parent / "migrations"
KEY_PREFIX = "pds-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyIdentity:
    name: str
    tenant: str
    requests_per_minute: int = 0    # 0: no limit
    tokens_per_minute: int = 0


def _aware(at: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def _sqlite_write_ahead_log(dbapi_connection, _record) -> None:
    """Readers no longer block the writer, and a commit no longer syncs the disk twice: in WAL
    mode with synchronous=NORMAL a crash of any process loses nothing committed and the database
    never corrupts; a power cut may lose the last commits. (Several pdserve processes share the
    file: WAL needs them on one host, as SQLite always did.) PostgreSQL is the production store."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            pathlib.Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        sqlite = url.startswith("sqlite")
        # A pre-ping finds server connections that died while pooled; a SQLite file has none,
        # and pinging costs a query per session.
        self.engine: Engine = create_engine(url, pool_pre_ping=not sqlite)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_write_ahead_log)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def session(self) -> Session:
        return self._sessions()

    # ---- API keys ----
    def create_api_key(self, name: str, tenant: str = "default", requests_per_minute: int = 0,
                       tokens_per_minute: int = 0) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s, s.begin():
            s.add(ApiKey(name=name, tenant=tenant, key_hash=hash_key(key), key_prefix=key[:8],
                         requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute))
        return key

    def set_api_key_limits(self, name: str, requests_per_minute: int, tokens_per_minute: int) -> bool:
        with self.session() as s, s.begin():
            row = s.scalar(select(ApiKey).where(ApiKey.name == name))
            if row is None:
                return False
            row.requests_per_minute, row.tokens_per_minute = requests_per_minute, tokens_per_minute
            return True

    def verify_api_key(self, key: str) -> KeyIdentity | None:
        with self.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False)))
            return KeyIdentity(row.name, row.tenant, row.requests_per_minute, row.tokens_per_minute) if row else None

    def revoke_api_key(self, name: str) -> bool:
        with self.session() as s, s.begin():
            row = s.scalar(select(ApiKey).where(ApiKey.name == name))
            if row is None:
                return False
            row.revoked = True
            return True

    def count_api_keys(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked.is_(False)))

    # ---- scenarios ----
    def upsert_scenario(self, name: str, match_rules: dict, ttft_slo_ms: float, tpot_slo_ms: float) -> None:
        with self.session() as s, s.begin():
            row = s.scalar(select(Scenario).where(Scenario.name == name))
            if row is None:
                s.add(Scenario(name=name, match_rules=match_rules, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms))
            else:
                row.match_rules, row.ttft_slo_ms, row.tpot_slo_ms = match_rules, ttft_slo_ms, tpot_slo_ms

    def get_scenario(self, name: str) -> Scenario | None:
        with self.session() as s:
            return s.scalar(select(Scenario).where(Scenario.name == name))

    def delete_scenario(self, name: str) -> bool:
        with self.session() as s, s.begin():
            row = s.scalar(select(Scenario).where(Scenario.name == name))
            if row is None:
                return False
            s.delete(row)
            return True

    def add_ratio_change(self, scenario: str, old: tuple[int, int], new: tuple[int, int], reason: str,
                         inputs: dict) -> None:
        with self.session() as s, s.begin():
            s.add(RatioChange(scenario=scenario, old_prefill=old[0], old_decode=old[1], new_prefill=new[0],
                              new_decode=new[1], reason=reason[:512], inputs=inputs))

    def ratio_history(self, scenario: str, limit: int = 100) -> list[RatioChange]:
        with self.session() as s:
            return list(s.scalars(select(RatioChange).where(RatioChange.scenario == scenario)
                                  .order_by(RatioChange.id.desc()).limit(limit)))

    def last_ratio_change_at(self) -> dict[str, dt.datetime]:
        """Per scenario, when its ratio last changed (the controller's cooldown restarts from it)."""
        with self.session() as s:
            rows = s.execute(select(RatioChange.scenario, func.max(RatioChange.at)).group_by(RatioChange.scenario))
            return {scenario: _aware(at) for scenario, at in rows}

    # ---- operator state (survives router restarts) ----
    def set_pin(self, scenario: str, ratio: tuple[int, int] | None) -> None:
        with self.session() as s, s.begin():
            s.execute(delete(RatioPin).where(RatioPin.scenario == scenario))
            if ratio is not None:
                s.add(RatioPin(scenario=scenario, num_prefill=ratio[0], num_decode=ratio[1]))

    def pins(self) -> dict[str, tuple[int, int]]:
        with self.session() as s:
            return {r.scenario: (r.num_prefill, r.num_decode) for r in s.scalars(select(RatioPin))}

    def set_drained(self, worker_id: str, drained: bool) -> None:
        with self.session() as s, s.begin():
            s.execute(delete(WorkerDrain).where(WorkerDrain.worker_id == worker_id))
            if drained:
                s.add(WorkerDrain(worker_id=worker_id))

    def drained_workers(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(WorkerDrain.worker_id)))

    def list_scenarios(self) -> list[Scenario]:
        with self.session() as s:
            return list(s.scalars(select(Scenario).order_by(Scenario.name)))

    # ---- history ----
    def record_worker_event(self, worker_id: str, role: str, event: str, detail: str = "") -> None:
        with self.session() as s, s.begin():
            s.add(WorkerEvent(worker_id=worker_id, role=role, event=event, detail=detail[:512]))

    def worker_events(self, worker_id: str) -> list[WorkerEvent]:
        with self.session() as s:
            return list(s.scalars(select(WorkerEvent).where(WorkerEvent.worker_id == worker_id)
                                  .order_by(WorkerEvent.id)))

    def record_request(self, rec: RequestRecord) -> None:
        """Inserts, never overwrites: request ids are unique (the gateway suffixes a client's)."""
        with self.session() as s, s.begin():
            s.add(rec)

    def record_requests(self, rows: list[dict]) -> None:
        """Many request records (RequestRecord's columns as dicts) in one transaction: one
        executemany, where per-record ORM inserts cost a commit (an fsync on SQLite) each."""
        if rows:
            with self.engine.begin() as conn:
                conn.execute(insert(RequestRecord), rows)

    def get_request(self, req_id: str) -> RequestRecord | None:
        with self.session() as s:
            return s.get(RequestRecord, req_id)

    def count_requests(self, outcome: str | None = None) -> int:
        query = select(func.count()).select_from(RequestRecord)
        if outcome is not None:
            query = query.where(RequestRecord.outcome == outcome)
        with self.session() as s:
            return s.scalar(query)
