"""IC-Cache's rows: cached examples and routed answers awaiting feedback. Blocking calls: async
callers run them in a thread. Conversions to the policy's objects live in pdserve/iccache."""
from __future__ import annotations

from sqlalchemy import delete, func, select

from pdserve.store.models import ICExample, ICOffload, ICPolicyState
from pdserve.store.repository import Store

_STAT_FIELDS = ("value", "value_at_unix_s", "num_uses", "num_successes", "quality", "num_ratings", "num_replays",
                "answer_text")


class ICCacheRepository:
    def __init__(self, store: Store):
        self.store = store

    def add_example(self, row: ICExample) -> int:
        with self.store.session() as s, s.begin():
            s.add(row)
            s.flush()
            return row.id

    def examples(self) -> list[ICExample]:
        with self.store.session() as s:
            return list(s.scalars(select(ICExample).order_by(ICExample.id)))

    def num_examples(self) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(ICExample))

    def update_examples(self, updates: list[dict]) -> None:
        """`updates`: dicts with `id` and any of the statistics (and the answer, after a replay)."""
        with self.store.session() as s, s.begin():
            for u in updates:
                row = s.get(ICExample, u["id"])
                if row is not None:
                    for name in _STAT_FIELDS:
                        if name in u:
                            setattr(row, name, u[name])

    def delete_examples(self, example_ids: list[int]) -> None:
        if example_ids:
            with self.store.session() as s, s.begin():
                s.execute(delete(ICExample).where(ICExample.id.in_(example_ids)))

    def record_answer(self, row: ICOffload) -> None:
        with self.store.session() as s, s.begin():
            s.merge(row)

    def answer(self, response_id: str, tenant: str = "") -> ICOffload | None:
        with self.store.session() as s:
            row = s.get(ICOffload, response_id)
            return row if row is not None and row.tenant == tenant else None

    def rate(self, response_id: str, quality: float, tenant: str = "") -> tuple[ICOffload | None, bool]:
        """The answer's row and whether this rating is its first (only the first trains). Another
        tenant's answer reads as unknown: ratings train a shared router."""
        with self.store.session() as s, s.begin():
            row = s.get(ICOffload, response_id, with_for_update=True)
            if row is None or row.tenant != tenant:
                return None, False
            first = row.quality is None
            row.quality = quality
            return row, first

    def save_policy_states(self, states: dict[str, dict], now_unix_s: float) -> None:
        with self.store.session() as s, s.begin():
            for name, state in states.items():
                s.merge(ICPolicyState(name=name, state=state, updated_unix_s=now_unix_s))

    def policy_states(self) -> dict[str, dict]:
        with self.store.session() as s:
            return {row.name: row.state for row in s.scalars(select(ICPolicyState))}
