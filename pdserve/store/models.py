"""ORM models. Schema changes go through Alembic migrations in store/migrations/versions."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    tenant: Mapped[str] = mapped_column(String(128), default="default")
    # SHA-256 of the key: keys are 256-bit random, so a plain digest is not brute-forceable.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    requests_per_minute: Mapped[int] = mapped_column(Integer, default=0, server_default="0")   # 0: no limit
    tokens_per_minute: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Scenario(Base):
    __tablename__ = "scenarios"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    match_rules: Mapped[dict] = mapped_column(JSON, default=dict)
    ttft_slo_ms: Mapped[float] = mapped_column(Float)
    tpot_slo_ms: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class WorkerEvent(Base):
    __tablename__ = "worker_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(256), index=True)
    role: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(32))     # registered, role_changed, dead
    detail: Mapped[str] = mapped_column(String(512), default="")
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RequestRecord(Base):
    __tablename__ = "request_records"
    req_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    tenant: Mapped[str] = mapped_column(String(128), default="")
    endpoint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    num_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    num_completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(32))   # ok, client_error, overloaded, failed, cancelled
    status_code: Mapped[int] = mapped_column(Integer, default=200)


class RatioChange(Base):
    __tablename__ = "ratio_changes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scenario: Mapped[str] = mapped_column(String(128), index=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    old_prefill: Mapped[int] = mapped_column(Integer)
    old_decode: Mapped[int] = mapped_column(Integer)
    new_prefill: Mapped[int] = mapped_column(Integer)
    new_decode: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(512))
    inputs: Mapped[dict] = mapped_column(JSON, default=dict)


class RatioPin(Base):
    """A ratio an operator pinned; the controller enforces it until unpinned."""
    __tablename__ = "ratio_pins"
    scenario: Mapped[str] = mapped_column(String(128), primary_key=True)
    num_prefill: Mapped[int] = mapped_column(Integer)
    num_decode: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkerDrain(Base):
    """A worker an operator drained: it gets no new work, also after it or the router restarts."""
    __tablename__ = "worker_drains"
    worker_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ICExample(Base):
    """IC-Cache: a large model's past answer, kept to be shown to a smaller model as an example.
    Times are Unix seconds (the value decays across restarts)."""
    __tablename__ = "iccache_examples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_text: Mapped[str] = mapped_column(Text)
    answer_text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256))
    # The API key tenant whose request this answered ("" without keys): shown only to its
    # requests unless iccache.share_examples_across_tenants.
    tenant: Mapped[str] = mapped_column(String(128), default="", server_default="")
    embedding: Mapped[bytes] = mapped_column(LargeBinary)      # float32, unit norm
    created_unix_s: Mapped[float] = mapped_column(Float)
    value: Mapped[float] = mapped_column(Float)
    value_at_unix_s: Mapped[float] = mapped_column(Float)
    num_uses: Mapped[int] = mapped_column(Integer, default=0)
    num_successes: Mapped[int] = mapped_column(Integer, default=0)
    quality: Mapped[float] = mapped_column(Float)
    num_ratings: Mapped[int] = mapped_column(Integer, default=0)
    num_replays: Mapped[int] = mapped_column(Integer, default=0)


class ICOffload(Base):
    """One routed answer: which arm and examples made it, so that feedback on the response id
    can train the router and credit the examples."""
    __tablename__ = "iccache_answers"
    response_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    arm: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(256))
    tenant: Mapped[str] = mapped_column(String(128), default="")   # only this API key tenant may rate it
    chosen: Mapped[list] = mapped_column(JSON, default=list)    # [[example_id, similarity, utility], ...]
    context: Mapped[list] = mapped_column(JSON, default=list)   # the bandit's context vector
    request_text: Mapped[str] = mapped_column(Text, default="")  # scrubbed (offline scoring against gold answers)
    answer_text: Mapped[str] = mapped_column(Text, default="")   # scrubbed: scored against a gold answer later
    example_id: Mapped[int | None] = mapped_column(Integer, nullable=True)   # the example a large answer became
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    quality: Mapped[float | None] = mapped_column(Float, nullable=True)   # set once rated


class ICPolicyState(Base):
    """IC-Cache's learned routing state (the bandit's, the example selector's), so that a restart
    keeps what feedback taught it. One JSON document per policy."""
    __tablename__ = "iccache_policy_state"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[dict] = mapped_column(JSON)
    updated_unix_s: Mapped[float] = mapped_column(Float)
