"""IC-Cache in the gateway. A request for the routed model name goes through it:

1. `plan`: embed the request text, fetch the nearest cached examples (vector index), let the
   selector keep the useful ones, and let the bandit choose the large model or the small one
   with those examples, given both pools' live load. The small model's prompt gets the examples
   first, in a stable order (a shared, cacheable prefix), then the request.
2. `record`: after the answer, remember which arm and examples made it (for feedback by response
   id); a large-model answer becomes a new example (personal data scrubbed), evicting by value
   per byte when the cache is full.
3. `feedback`: a rating (0..1) of the answer trains the bandit and the selector and credits the
   examples; a rating of a large answer rates the example made from it.
4. `replay_step`: when the large pool has room, re-ask it for the example a better answer would
   help most (see policy/iccache/examples.py).

State of record lives in the store; the example cache, index, selector and bandit are rebuilt in
memory at start (`load`): the bandit and selector from the state they saved after their last
lesson (`save_policy`), so a restart keeps what feedback taught them. Blocking work (embedding,
database) runs in threads."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable

import numpy as np

from pdserve.clock import Clock
from pdserve.iccache.embedder import BaseEmbedder
from pdserve.iccache.index import VectorIndex
from pdserve.policy.iccache.bandit import Arm, ModelChooser, context
from pdserve.policy.iccache.examples import Example, ExampleCache
from pdserve.policy.iccache.scoring import token_f1
from pdserve.policy.iccache.scrub import scrub
from pdserve.policy.iccache.selection import Chosen, ExampleSelector
from pdserve.store.iccache import ICCacheRepository
from pdserve.store.models import ICExample, ICOffload

# How long feedback for a running stream waits for its answer to be recorded: a stream's
# end is recorded moments after its last byte, so this bounds only a stream that never ends.
_EXPECTED_WAIT_S = 5.0
log = logging.getLogger("pdserve.iccache")
GOOD_ANSWER = 0.5     # a rating at or above this counts as a successful offload


@dataclass
class Plan:
    arm: Arm
    model: str
    chosen: list[Chosen]
    context: np.ndarray
    request_text: str
    embedding: np.ndarray
    selected: list[Chosen] = field(default_factory=list)   # the selector's examples, whichever arm
    moved: bool = False                                      # already moved to the other pool once
    tenant: str = ""            # the request's API key tenant: it alone may rate the answer, see its example

    @property
    def num_examples(self) -> int:
        return len(self.chosen) if self.arm is Arm.SMALL_WITH_EXAMPLES else 0


@dataclass
class ICCacheService:
    repo: ICCacheRepository
    embedder: BaseEmbedder
    large_model: str
    small_model: str
    clock: Clock                       # Unix seconds: example values decay across restarts
    cache: ExampleCache
    selector: ExampleSelector
    chooser: ModelChooser
    num_candidates: int = 16
    text_preamble: str = ""             # before every routed text prompt (prompting.text_prompt)
    full_load_requests: int = 32        # a worker's requests in flight that count as full load
    # Off: a tenant's requests are shown only examples made from its own requests; an example
    # holds a request and its answer, which another tenant must not read in its completion.
    share_examples_across_tenants: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {"routed": 0, "offloaded": 0, "moved": 0,
                                                              "examples_added": 0, "feedback": 0, "replays": 0})

    def __post_init__(self):
        # One vector index per scope (a tenant, or "" when examples are shared): a query searches
        # only what it may be shown, so other tenants' examples never crowd out its own.
        self._indexes: dict[str, VectorIndex] = {}
        self._tenant_of: dict[int, str] = {}     # indexed example -> its tenant (finds its index)
        # Answers being stored: feedback that arrives first (the client got the response before
        # the store write finished) waits for the write instead of reading 'unknown'.
        self._recording: dict[str, asyncio.Task] = {}
        self._expected: dict[str, asyncio.Future] = {}      # streams running, their answer not yet recorded

    def expect(self, response_id: str) -> None:
        """An answer for this id is on its way (a stream has started): feedback that arrives before
        the stream's end is recorded waits for it (up to _EXPECTED_WAIT_S) instead of 404."""
        self._expected.setdefault(response_id, asyncio.get_running_loop().create_future())

    def forget(self, response_id: str) -> None:
        """The expected answer will not be recorded (the request failed or was cancelled)."""
        _resolve(self._expected.pop(response_id, None))

    def record_soon(self, response_id: str, plan: Plan, answer_text: str) -> asyncio.Task:
        task = asyncio.ensure_future(self.record(response_id, plan, answer_text))
        self._recording[response_id] = task
        expected = self._expected.pop(response_id, None)
        task.add_done_callback(lambda _: (self._recording.pop(response_id, None), _resolve(expected)))
        return task

    async def load(self) -> None:
        rows = await asyncio.to_thread(self.repo.examples)
        for row in rows:
            ex = _from_row(row)
            self.cache.restore(ex)
            self._add_to_index(ex.example_id, ex.embedding, ex.tenant)
        states = await asyncio.to_thread(self.repo.policy_states)
        if "bandit" in states:
            self.chooser.restore(states["bandit"])
        if "selector" in states:
            self.selector.restore(states["selector"])
        log.info("IC-Cache: %d examples loaded (%d bytes), learned routing state %s", len(rows),
                 self.cache.num_bytes, "restored" if states else "new")

    async def save_policy(self) -> None:
        """The bandit's and the selector's learned state, to the store (after each lesson, and
        when an operator pauses or resumes offloading)."""
        await asyncio.to_thread(self.repo.save_policy_states, {"bandit": self.chooser.state(),
                                                               "selector": self.selector.state()},
                                self.clock.now_s())

    @property
    def num_indexed(self) -> int:
        return len(self._tenant_of)

    def _scope(self, tenant: str) -> str:
        return "" if self.share_examples_across_tenants else tenant

    def _add_to_index(self, example_id: int, embedding: np.ndarray, tenant: str) -> None:
        scope = self._scope(tenant)
        if (index := self._indexes.get(scope)) is None:
            index = self._indexes[scope] = VectorIndex(self.embedder.dim)
        index.add(example_id, embedding)
        self._tenant_of[example_id] = tenant

    def _unindex(self, example_id: int) -> None:
        if (tenant := self._tenant_of.pop(example_id, None)) is None:
            return
        scope = self._scope(tenant)
        index = self._indexes[scope]
        index.remove(example_id)
        if not len(index):
            del self._indexes[scope]

    async def plan(self, request_text: str, num_prompt_tokens: int, load: dict[Arm, float], tenant: str = "") -> Plan:
        """`tenant`: the request's API key tenant ("" without keys); it sees only its scope's examples."""
        embedding = (await asyncio.to_thread(self.embedder.embed, [request_text]))[0]
        index = self._indexes.get(self._scope(tenant))
        nearest = index.nearest(embedding, self.num_candidates) if index is not None else []
        candidates = [(self.cache.examples[i], sim) for i, sim in nearest if i in self.cache.examples]
        chosen = self.selector.select(candidates)
        x = context(max((c.similarity for c in chosen), default=0.0),
                    float(np.mean([c.utility for c in chosen])) if chosen else 0.0,
                    len(chosen), self.selector.config.max_examples, num_prompt_tokens)
        arm = self.chooser.choose(x, load, small_possible=bool(chosen)).arm
        self.counters["routed"] += 1
        self.counters["offloaded"] += arm is Arm.SMALL_WITH_EXAMPLES
        model = self.small_model if arm is Arm.SMALL_WITH_EXAMPLES else self.large_model
        return Plan(arm, model, chosen if arm is Arm.SMALL_WITH_EXAMPLES else [], x, request_text, embedding, chosen,
                    tenant=tenant)

    def move(self, plan: Plan) -> Plan | None:
        """The other arm, for a request its chosen pool refused (on-demand forwarding across the
        two pools: a full pool hands the request on instead of queueing it while the other has
        room). The large model may always take it; the small one only with examples selected and
        offloading not paused. Once per request, so two full pools still answer 429 at once."""
        if plan.moved:
            return None
        if plan.arm is Arm.SMALL_WITH_EXAMPLES:
            moved = replace(plan, arm=Arm.LARGE, model=self.large_model, chosen=[], moved=True)
        elif plan.selected and not self.chooser.paused:
            moved = replace(plan, arm=Arm.SMALL_WITH_EXAMPLES, model=self.small_model, chosen=plan.selected, moved=True)
        else:
            return None
        self.counters["moved"] += 1
        self.counters["offloaded"] += 1 if moved.arm is Arm.SMALL_WITH_EXAMPLES else -1
        return moved

    async def record(self, response_id: str, plan: Plan, answer_text: str) -> None:
        now_s, tenant = self.clock.now_s(), plan.tenant
        request_text = scrub(plan.request_text)
        chosen = [[c.example.example_id, c.similarity, c.utility] for c in plan.chosen]
        row = ICOffload(response_id=response_id, arm=plan.arm.value, model=plan.model, tenant=tenant, chosen=chosen,
                        context=[float(v) for v in plan.context], request_text=request_text,
                        answer_text=scrub(answer_text))
        if plan.arm is Arm.LARGE and answer_text.strip():
            answer = scrub(answer_text)
            example_id = await asyncio.to_thread(self.repo.add_example, ICExample(
                request_text=request_text, answer_text=answer, model=plan.model, embedding=plan.embedding.tobytes(),
                created_unix_s=now_s, value=0.0, value_at_unix_s=now_s, num_uses=0, num_successes=0,
                quality=0.5, num_ratings=0, num_replays=0, tenant=tenant))
            ex = Example(example_id, request_text, answer, plan.model, plan.embedding, created_s=now_s, tenant=tenant)
            evicted = self.cache.add(ex, now_s)
            if example_id not in evicted:
                self._add_to_index(example_id, plan.embedding, tenant)
                self.counters["examples_added"] += 1
            for gone in evicted:
                self._unindex(gone)
            await asyncio.to_thread(self.repo.delete_examples, evicted)
            await asyncio.to_thread(self.repo.update_examples, [_stats(ex)] if example_id not in evicted else [])
            row.example_id = example_id
        await asyncio.to_thread(self.repo.record_answer, row)

    async def feedback(self, response_id: str, quality: float | None = None, gold: str | None = None,
                       tenant: str = "") -> bool | None:
        """A rating (0..1), or a gold answer the stored answer is scored against (token F1).
        None: unknown response id; False: already rated (the first rating counts); True: learned."""
        if (expected := self._expected.get(response_id)) is not None:
            await asyncio.wait({expected}, timeout=_EXPECTED_WAIT_S)
        pending = self._recording.get(response_id)
        if pending is not None:
            await asyncio.wait({pending})
        if quality is None:
            row = await asyncio.to_thread(self.repo.answer, response_id, tenant)
            if row is None:
                return None
            quality = token_f1(row.answer_text, gold or "")
        row, first = await asyncio.to_thread(self.repo.rate, response_id, quality, tenant)
        if row is None or not first:
            return None if row is None else False
        self.counters["feedback"] += 1
        arm, success = Arm(row.arm), quality >= GOOD_ANSWER
        self.chooser.learn(arm, np.asarray(row.context), quality)
        if arm is Arm.SMALL_WITH_EXAMPLES:
            chosen = [Chosen(self.cache.examples[i], sim, u) for i, sim, u in row.chosen if i in self.cache.examples]
            self.selector.learn(chosen, success)
            self.cache.record_offload([i for i, _, _ in row.chosen], success, self.clock.now_s())
            touched = [self.cache.examples[i] for i, _, _ in row.chosen if i in self.cache.examples]
        else:
            example_id = row.example_id
            self.cache.rate_answer(example_id, quality)
            touched = [self.cache.examples[example_id]] if example_id in self.cache.examples else []
        await asyncio.to_thread(self.repo.update_examples, [_stats(e) for e in touched])
        await self.save_policy()
        return True

    async def replay_step(self, ask_large: Callable[[str], Awaitable[str]]) -> str | None:
        """Re-ask the large model for the most valuable poorly rated example. A fresh answer is
        unrated (quality 0.5): it replaces only an answer rated worse than that."""
        candidates = self.cache.replay_candidates(self.clock.now_s(), 1)
        if not candidates:
            return None
        ex = candidates[0]
        answer = scrub(await ask_large(ex.request_text))
        outcome = self.cache.apply_replay(ex.example_id, answer, 0.5)
        self.counters["replays"] += 1
        if outcome == "dropped":
            self._unindex(ex.example_id)
            await asyncio.to_thread(self.repo.delete_examples, [ex.example_id])
        else:
            await asyncio.to_thread(self.repo.update_examples, [_stats(ex)])
        return outcome

    def stats(self) -> dict:
        return {"num_examples": len(self.cache.examples), "num_bytes": self.cache.num_bytes,
                "capacity_bytes": self.cache.config.capacity_bytes, "num_evictions": self.cache.num_evictions,
                "paused": self.chooser.paused, "threshold": self.selector.threshold, "arms": self.chooser.stats(),
                "large_model": self.large_model, "small_model": self.small_model, **self.counters}


def _resolve(future: asyncio.Future | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _from_row(row: ICExample) -> Example:
    return Example(row.id, row.request_text, row.answer_text, row.model,
                   np.frombuffer(row.embedding, dtype=np.float32).copy(), created_s=row.created_unix_s,
                   value=row.value, value_at_s=row.value_at_unix_s, num_uses=row.num_uses,
                   num_successes=row.num_successes, quality=row.quality, num_ratings=row.num_ratings,
                   num_replays=row.num_replays, tenant=row.tenant)


def _stats(ex: Example) -> dict:
    return {"id": ex.example_id, "value": ex.value, "value_at_unix_s": ex.value_at_s, "num_uses": ex.num_uses,
            "num_successes": ex.num_successes, "quality": ex.quality, "num_ratings": ex.num_ratings,
            "num_replays": ex.num_replays, "answer_text": ex.answer_text}
