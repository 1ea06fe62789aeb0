"""Placement and its accounting: which workers serve a request, and in which order its prefill is
offered (on-demand forwarding).

Pure: no I/O, no clock reads. Placement for a request:
1. decode side: the live decode worker with the most free KV blocks that fit the prompt and one
   token more, what the worker's admission takes (free blocks = last heartbeat's count minus
   placements that heartbeat did not show yet, counted the same way). The answer's KV is not
   counted up front: it grows as the request decodes, a full worker preempts, and its next
   heartbeat shows what it holds. A worker whose batch is full (as many requests placed there
   and not yet done as the `max_batch_size` it registered with) would refuse: it ranks last;
2. prefill side: the live prefill worker with the fewest requests in flight (ties by id);
3. with no prefill/decode pair available, a live aggregated worker, by the same KV rule.
With cache-aware routing (a `PrefixIndex` given and the prompt's token ids passed), steps 1 and
2 score the few best-ranked workers plus every worker holding a prefix of the prompt by
cost = tokens left to compute or move (prompt minus cached prefix) + prompt tokens already
queued on the worker (prefill) + load_tokens_per_request x requests in flight, and take the
cheapest (KV must still fit on the decode side).
Conditional disaggregation (`local_prefill_max_tokens` > 0, cache-aware routing on): when the
chosen decode worker holds all of the prompt's prefix but at most that many tokens, the request
is prefilled there (no prefill worker, no KV transfer): the hop and the transfer cost more than
the few tokens' compute, which briefly delays that worker's decode steps.
Each is O(log n) in the number of workers (the registry's ranked index) plus the prompt's blocks
and the workers holding them. The caller reports the
request's progress (`on_start`, `on_prefill_forwarded`, `on_prefill_done`, `on_decode_done`) so
load between heartbeats is counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.policy.prefix_cache import PrefixIndex, block_hashes
from pdserve.policy.registry import NoCapacity, NoWorkers, Role, WorkerRecord, WorkerRegistry


@dataclass(frozen=True)
class Placement:
    decode_id: str                   # the decode or aggregated worker that streams tokens
    prefill_id: str | None           # None: aggregated, prefill runs on the decode_id worker
    kv_backend: str | None
    num_blocks: int
    req_id: str = ""
    prefill_tokens: int = 0          # prompt tokens the prefill worker is expected to compute
    local_prefill: bool = False      # a decode worker prefills the few tokens its cache lacks

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None


class _Prompt:
    """Which workers hold how much of the prompt: its block names per block size, computed once
    per placement (lazily) from the token ids, or given as (tokens per block, names)."""

    def __init__(self, index: PrefixIndex | None, token_ids=None, hashed: tuple[int, list[int]] | None = None):
        self._index = index
        self._token_ids = token_ids
        self._hashed = hashed
        self._overlaps: dict[int, dict[str, int]] = {}

    @property
    def known(self) -> bool:
        return self._index is not None and bool(self._token_ids or (self._hashed and self._hashed[1]))

    def overlaps(self, block_size_tokens: int) -> dict[str, int]:
        """Leading blocks held, per worker, in blocks of `block_size_tokens` (or the given size)."""
        if not self.known:
            return {}
        size = self._hashed[0] if self._hashed else block_size_tokens
        if size not in self._overlaps:
            hashes = self._hashed[1] if self._hashed else block_hashes(self._token_ids, size)
            self._overlaps[size] = self._index.overlaps(hashes)
        return self._overlaps[size]

    def cached_tokens(self, w: WorkerRecord) -> int:
        size = self._hashed[0] if self._hashed else w.block_size_tokens
        return self.overlaps(w.block_size_tokens).get(w.worker_id, 0) * size


class Dispatcher:
    def __init__(self, registry: WorkerRegistry, kv_backend_preference: tuple[str, ...] = ("ucx", "tcp"),
                 prefix_index: PrefixIndex | None = None, load_tokens_per_request: float = 512.0,
                 num_load_candidates: int = 4, local_prefill_max_tokens: int = 0):
        self.registry = registry
        self.kv_backend_preference = kv_backend_preference
        # Cache-aware routing when set: the workers' cached prefixes, fed by their heartbeats.
        self.prefix_index = prefix_index
        self.load_tokens_per_request = load_tokens_per_request
        self.num_load_candidates = num_load_candidates
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def scenario_for(self, model: str, scenario: str) -> str:
        """The scenario a request for `model` runs in: the classified one when it has workers of
        that model, or no workers at all (a scenario without a pool of its own borrows every
        worker); when its workers serve only other models, the one scenario whose workers serve
        this model (a model with a pool of its own, such as IC-Cache's small model), so that
        pool's ratio controller sees the request; else the classified one."""
        if self.registry.has_placeable(model, scenario) or not self.registry.has_any_placeable(scenario):
            return scenario
        serving = self.registry.scenarios_serving(model)
        return next(iter(serving)) if len(serving) == 1 else scenario

    def place(self, model: str, num_prompt_tokens: int, max_tokens: int,
              exclude_ids: frozenset[str] = frozenset(), scenario: str | None = None, req_id: str = "",
              prompt_ids=None, prompt_hashes: tuple[int, list[int]] | None = None) -> Placement:
        """Place on the scenario's workers; a scenario with no workers of its own uses every worker.
        O(log n) in the number of workers (plus skipped, excluded or unreachable ones, and those
        holding the prompt's prefix). `prompt_ids`, or `prompt_hashes` (tokens per block, the
        prompt's block names), enable cache-aware placement. `max_tokens` is not reserved: counted
        until a heartbeat showed the request, it made a worker look full that had room (a chat
        request without max_tokens counts as its whole context), so a burst got 429s that the same
        requests a few seconds apart did not."""
        if scenario is not None and not self.registry.has_placeable(model, scenario):
            scenario = None
        admit_tokens = num_prompt_tokens + 1     # as Engine.admit: the first decode step's slot
        prompt = _Prompt(self.prefix_index, prompt_ids, prompt_hashes)
        decode = self._best_kv(model, Role.DECODE, scenario, admit_tokens, exclude_ids, prompt)
        local_tokens = self._local_prefill_tokens(decode, prompt, num_prompt_tokens) if decode is not None else None
        if local_tokens is not None:
            return Placement(decode.worker_id, None, None, decode.blocks_needed(admit_tokens), req_id,
                             local_tokens, local_prefill=True)
        if decode is not None:
            reachable = lambda w: self._common_backend(w, decode) is not None  # noqa: E731
            prefill = self._cheapest(self.registry.ranked(model, Role.PREFILL, scenario, self._k(prompt),
                                                          exclude_ids, reachable),
                                     model, Role.PREFILL, scenario, exclude_ids, prompt, num_prompt_tokens,
                                     reachable)
            if prefill is not None:
                backend = self._common_backend(prefill, decode)
                return Placement(decode.worker_id, prefill.worker_id, backend, decode.blocks_needed(admit_tokens),
                                 req_id, num_prompt_tokens - prompt.cached_tokens(prefill))
        agg = self._best_kv(model, Role.AGGREGATED, scenario, admit_tokens, exclude_ids, prompt)
        if agg is not None:
            return Placement(agg.worker_id, None, None, agg.blocks_needed(admit_tokens), req_id)
        if not self._can_serve(model):
            raise NoWorkers(f"no live worker can serve model {model!r} now (it needs an aggregated worker, "
                            f"or a prefill and a decode worker)")
        raise NoCapacity("no worker has room for this request now (a free batch slot and the KV it needs)")

    def _local_prefill_tokens(self, decode: WorkerRecord, prompt: _Prompt, num_prompt_tokens: int) -> int | None:
        """Tokens the decode worker would compute itself, or None: a prefill worker does it.
        Only on a cache hit: a short cold prompt still goes to a prefill worker, so decode workers
        never take prefill work that the index cannot vouch is small."""
        cached = prompt.cached_tokens(decode) if self.local_prefill_max_tokens > 0 else 0
        left = num_prompt_tokens - cached
        return left if cached > 0 and left <= self.local_prefill_max_tokens else None

    def _can_serve(self, model: str) -> bool:
        """Placeable workers exist for a whole request, full or not (then it is a capacity problem).
        This request's exclusions do not count: a worker that just refused for capacity is full,
        not gone (a gone one is suspect, hence not placeable)."""
        has = lambda role: bool(self.registry.ranked(model, role, None, 1))  # noqa: E731
        return has(Role.AGGREGATED) or (has(Role.PREFILL) and has(Role.DECODE))

    def prefill_candidates(self, model: str, decode_id: str, exclude_ids: frozenset[str] = frozenset(),
                           limit: int = 8) -> list[tuple[str, str]]:
        """(prefill worker, KV backend) pairs able to feed `decode_id`, least loaded first: the
        order in which on-demand forwarding offers a request (same scenario as the decode worker)."""
        decode = self.registry.get(decode_id)
        if decode is None:
            return []
        reachable = lambda w: self._common_backend(w, decode) is not None  # noqa: E731
        pool = (self.registry.ranked(model, Role.PREFILL, decode.scenario, limit, exclude_ids, reachable)
                or self.registry.ranked(model, Role.PREFILL, None, limit, exclude_ids, reachable))
        return [(w.worker_id, self._common_backend(w, decode)) for w in pool]

    def forwarding_order(self, model: str, placement: Placement, max_offers: int) -> list[str]:
        """On-demand forwarding: the prefill workers a request is offered to, in order. The placed
        worker first, then the next least-loaded ones that reach the same decode worker over the
        same KV backend (the reservation is armed for that backend). The live router and the
        simulator both offer in exactly this order."""
        if placement.prefill_id is None:
            return []
        others = [wid for wid, backend in self.prefill_candidates(model, placement.decode_id, limit=max_offers + 1)
                  if wid != placement.prefill_id and backend == placement.kv_backend]
        return [placement.prefill_id, *others][:max_offers]

    def _k(self, prompt: _Prompt) -> int:
        return self.num_load_candidates if prompt.known else 1

    def _best_kv(self, model: str, role: Role, scenario: str | None, num_tokens: int,
                 exclude_ids: frozenset[str], prompt: _Prompt) -> WorkerRecord | None:
        # Ranked with a free batch slot first, then by free KV: if the best-placed worker has no
        # slot or cannot fit the request, none can.
        fits_here = lambda w: w.has_batch_slot and w.est_free_blocks >= w.blocks_needed(num_tokens)  # noqa: E731
        found = self.registry.ranked(model, role, scenario, self._k(prompt), exclude_ids,
                                     lambda w: True if fits_here(w) else None)
        return self._cheapest(found, model, role, scenario, exclude_ids, prompt, num_tokens, fits_here)

    def _cheapest(self, ranked: list[WorkerRecord], model: str, role: Role, scenario: str | None,
                  exclude_ids: frozenset[str], prompt: _Prompt, num_tokens: int, accept) -> WorkerRecord | None:
        """The best-ranked worker, or with cache-aware routing the cheapest among the ranked ones
        and those holding a prefix of the prompt (the rank order breaks ties)."""
        if not prompt.known or not ranked:
            return ranked[0] if ranked else None
        candidates = {w.worker_id: w for w in ranked}
        for size in {w.block_size_tokens for w in ranked}:
            for worker_id in prompt.overlaps(size):
                w = self.registry.get(worker_id)
                if (w is not None and worker_id not in candidates and worker_id not in exclude_ids
                        and w.model == model and w.role is role and (scenario is None or w.scenario == scenario)
                        and self.registry.placeable(w) and accept(w)):
                    candidates[worker_id] = w
        rank = {w.worker_id: i for i, w in enumerate(ranked)}
        cost = lambda w: (self._cost(w, prompt, num_tokens), rank.get(w.worker_id, len(rank)), w.worker_id)  # noqa: E731
        return min(candidates.values(), key=cost, default=None)

    def _cost(self, w: WorkerRecord, prompt: _Prompt, num_tokens: int) -> float:
        # Work ahead of the request (prompt tokens queued there) plus its own uncached tokens,
        # plus a fixed cost per request in flight (what a decode worker's load is measured in).
        cached = prompt.cached_tokens(w)
        return max(0, num_tokens - cached) + w.inflight_prefill_tokens + self.load_tokens_per_request * w.num_inflight

    def _common_backend(self, a: WorkerRecord, b: WorkerRecord) -> str | None:
        return next((x for x in self.kv_backend_preference if x in a.kv_addresses and x in b.kv_addresses), None)

    def _adjust(self, worker_id: str | None, inflight: int = 0, prefill_tokens: int = 0) -> None:
        rec = self.registry.get(worker_id) if worker_id else None
        if rec is not None:
            rec.num_inflight = max(0, rec.num_inflight + inflight)
            rec.inflight_prefill_tokens = max(0, rec.inflight_prefill_tokens + prefill_tokens)
            self.registry.touch(rec)

    def on_start(self, p: Placement) -> None:
        rec = self.registry.get(p.decode_id)
        if rec is not None:
            rec.placed_blocks[p.req_id] = p.num_blocks
            rec.num_unseen_blocks += p.num_blocks
        self._adjust(p.decode_id, inflight=1)
        self._adjust(p.prefill_id, inflight=1, prefill_tokens=p.prefill_tokens)

    def on_prefill_done(self, prefill_id: str | None, num_tokens: int = 0) -> None:
        """`num_tokens`: the placement's `prefill_tokens`."""
        self._adjust(prefill_id, inflight=-1, prefill_tokens=-num_tokens)

    def on_prefill_forwarded(self, from_id: str, to_id: str, num_tokens: int = 0) -> None:
        """The request moved to another prefill worker after a rejection."""
        self._adjust(from_id, inflight=-1, prefill_tokens=-num_tokens)
        self._adjust(to_id, inflight=1, prefill_tokens=num_tokens)

    def on_finish(self, p: Placement) -> None:
        self.on_decode_done(p.decode_id, p.req_id)

    def on_decode_done(self, decode_id: str, req_id: str) -> None:
        """The request left its decode worker. Its blocks stop counting at once if the worker's last
        heartbeat never showed them; otherwise that count already holds them until the next one."""
        rec = self.registry.get(decode_id)
        if rec is not None:
            blocks = rec.placed_blocks.pop(req_id, 0)
            if req_id not in rec.held_req_ids:
                rec.num_unseen_blocks -= blocks
        self._adjust(decode_id, inflight=-1)
