"""Routing policy on a virtual clock: leases, placement, forwarding order, accounting, request state machine."""
import pytest

from pdserve.clock import VirtualClock
from pdserve.policy.dispatch import Dispatcher
from pdserve.policy.registry import NoCapacity, NoWorkers, Role, WorkerRecord, WorkerRegistry
from pdserve.policy.request_state import RequestState, RequestTracker


def make_worker(wid: str, role: Role, free_blocks: int = 100, backends=("ucx", "tcp"), model: str = "m") -> WorkerRecord:
    return WorkerRecord(worker_id=wid, role=role, model=model, grpc_address=f"h:{wid}",
                        kv_addresses={b: b"addr" for b in backends}, num_total_kv_blocks=100,
                        block_size_tokens=16, max_model_len_tokens=4096, num_free_kv_blocks=free_blocks)


@pytest.fixture
def clock():
    return VirtualClock()


def test_lease_expiry_marks_dead_and_heartbeat_revives(clock):
    reg = WorkerRegistry(lease_s=3.0)
    reg.register(make_worker("d1", Role.DECODE), clock.now_s())
    clock.advance(2.9)
    assert reg.expire(clock.now_s()) == []
    clock.advance(0.2)
    assert reg.expire(clock.now_s()) == ["d1"] and reg.alive("m", Role.DECODE) == []
    assert reg.heartbeat("d1", 50, 1, clock.now_s()) and reg.alive("m", Role.DECODE)[0].num_free_kv_blocks == 50
    assert not reg.heartbeat("unknown", 1, 0, clock.now_s())


def test_placement_prefers_most_free_kv_and_least_loaded_prefill(clock):
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d1", Role.DECODE, 40), make_worker("d2", Role.DECODE, 90),
              make_worker("p1", Role.PREFILL), make_worker("p2", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    first = disp.place("m", 100, 100)
    assert (first.decode_id, first.prefill_id, first.kv_backend) == ("d2", "p1", "ucx")
    assert first.num_blocks == 7                        # ceil(101 / 16): the prompt and one slot, as the worker admits
    disp.on_start(first)
    second = disp.place("m", 100, 100)
    assert second.prefill_id == "p2"                    # p1 has one in flight
    assert reg.get("d2").est_free_blocks == 90 - 7


def test_the_answer_is_not_reserved_up_front(clock):
    """A decode worker admits a request by its prompt and grows its KV as it decodes (preempting
    when full): the router counts placements the same way, or a burst of requests that may answer
    at length (a chat request without max_tokens may answer its whole context) looks like a full
    worker until the next heartbeat, and gets 429s the worker would not have given."""
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d", Role.DECODE, 100), make_worker("p", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    for i in range(14):                                  # 7 blocks each, no heartbeat in between
        disp.on_start(disp.place("m", 100, 3996, req_id=f"r{i}"))
    assert reg.get("d").est_free_blocks == 2
    with pytest.raises(NoCapacity):
        disp.place("m", 100, 1, req_id="r14")


def test_router_accounting_spreads_a_burst_until_the_next_heartbeat(clock):
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d1", Role.DECODE, 30), make_worker("d2", Role.DECODE, 30), make_worker("p", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    placed = []
    for _ in range(2):
        p = disp.place("m", 400, 400)                   # 26 blocks each
        disp.on_start(p)
        placed.append(p.decode_id)
    assert sorted(placed) == ["d1", "d2"]
    with pytest.raises(NoCapacity):
        disp.place("m", 400, 400)
    reg.heartbeat("d1", 30, 0, clock.now_s())           # d1 finished its request
    assert disp.place("m", 400, 400).decode_id == "d1"


def test_short_requests_faster_than_heartbeats_are_never_refused(clock):
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d", Role.DECODE, 30), make_worker("p", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    for i in range(1000):                                # no heartbeat in between: each finishes first
        p = disp.place("m", 100, 100, req_id=f"r{i}")
        disp.on_start(p)
        disp.on_prefill_done(p.prefill_id)
        disp.on_finish(p)
    assert reg.get("d").est_free_blocks == 30


def test_a_heartbeat_keeps_placements_the_worker_has_not_seen(clock):
    reg = WorkerRegistry(3.0)
    reg.register(make_worker("d", Role.DECODE, 100), clock.now_s())
    reg.register(make_worker("p", Role.PREFILL), clock.now_s())
    disp = Dispatcher(reg)
    p = disp.place("m", 100, 100, req_id="r")              # 7 blocks
    disp.on_start(p)
    d = reg.get("d")
    reg.heartbeat("d", 100, 0, clock.now_s(), held_req_ids=frozenset())   # sent before the worker admitted it
    assert d.est_free_blocks == 93
    reg.heartbeat("d", 93, 1, clock.now_s(), held_req_ids=frozenset({"r"}))
    assert d.est_free_blocks == 93                        # counted once, by the worker now
    disp.on_finish(p)
    assert d.est_free_blocks == 93                        # the worker still held it at its last count
    reg.heartbeat("d", 100, 0, clock.now_s(), held_req_ids=frozenset())
    assert d.est_free_blocks == 100


def test_a_suspect_worker_gets_no_work_until_it_heartbeats(clock):
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d1", Role.DECODE, 90), make_worker("d2", Role.DECODE, 40), make_worker("p", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    assert disp.place("m", 10, 10).decode_id == "d1"
    reg.mark_suspect("d1")
    assert disp.place("m", 10, 10).decode_id == "d2"
    reg.heartbeat("d1", 90, 0, clock.now_s())
    assert disp.place("m", 10, 10).decode_id == "d1"


def test_common_backend_and_aggregated_fallback(clock):
    reg = WorkerRegistry(3.0)
    reg.register(make_worker("d", Role.DECODE, backends=("tcp",)), clock.now_s())
    reg.register(make_worker("p", Role.PREFILL, backends=("ucx",)), clock.now_s())
    reg.register(make_worker("a", Role.AGGREGATED), clock.now_s())
    p = Dispatcher(reg).place("m", 10, 10)
    assert p.decode_id == "a" and not p.disaggregated


def test_forwarding_order_starts_at_the_placed_worker_and_keeps_the_backend(clock):
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d", Role.DECODE), make_worker("p1", Role.PREFILL), make_worker("p2", Role.PREFILL),
              make_worker("p3", Role.PREFILL, backends=("tcp",)), make_worker("p4", Role.PREFILL)):
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    placement = disp.place("m", 10, 10)
    disp.on_start(placement)
    assert placement.kv_backend == "ucx"
    # p3 speaks only tcp: the reservation is armed for ucx, so it is never offered.
    assert disp.forwarding_order("m", placement, 3) == ["p1", "p2", "p4"]
    assert disp.forwarding_order("m", placement, 1) == ["p1"]


def test_no_workers_vs_no_capacity(clock):
    reg = WorkerRegistry(3.0)
    with pytest.raises(NoWorkers):
        Dispatcher(reg).place("m", 10, 10)
    reg.register(make_worker("d", Role.DECODE, free_blocks=1), clock.now_s())
    reg.register(make_worker("p", Role.PREFILL), clock.now_s())
    with pytest.raises(NoCapacity):
        Dispatcher(reg).place("m", 100, 100)
    with pytest.raises(NoWorkers):
        Dispatcher(reg).place("other-model", 1, 1)


def test_request_state_machine(clock):
    t = RequestTracker("r", clock.now_s())
    t.to(RequestState.PLACED, 1.0)
    t.to(RequestState.WAITING_FOR_KV, 1.1)
    t.to(RequestState.DECODING, 1.5)
    t.to(RequestState.FINISHED, 2.0)
    assert [s for s, _ in t.history][-1] is RequestState.FINISHED
    with pytest.raises(ValueError, match="illegal transition"):
        t.to(RequestState.DECODING, 3.0)
    t2 = RequestTracker("r2", 0.0)
    with pytest.raises(ValueError):
        t2.to(RequestState.DECODING, 0.1)               # must be placed first


def test_a_request_whose_reservation_fails_can_migrate_again_and_again():
    """A decode worker that hangs on ReserveKV fails the request before it is placed; the retry
    can fail the same way (a second hung worker) and still be placed a third time."""
    t = RequestTracker("r", 0.0)
    t.to(RequestState.MIGRATING, 10.0, "ReserveKV deadline exceeded")
    t.to(RequestState.MIGRATING, 20.0, "ReserveKV deadline exceeded again")
    t.to(RequestState.PLACED, 20.1)
    t.to(RequestState.DECODING, 20.5)
    t.to(RequestState.FINISHED, 21.0)
    assert [s for s, _ in t.history][:2] == [RequestState.MIGRATING, RequestState.MIGRATING]


def test_cache_aware_placement_follows_the_prefix_until_load_outweighs_it(clock):
    from pdserve.policy.prefix_cache import PrefixIndex, block_hashes
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d1", Role.DECODE, 900), make_worker("d2", Role.DECODE, 800),
              make_worker("p1", Role.PREFILL), make_worker("p2", Role.PREFILL), make_worker("p3", Role.PREFILL)):
        reg.register(w, clock.now_s())
    index = PrefixIndex()
    disp = Dispatcher(reg, prefix_index=index, load_tokens_per_request=256, num_load_candidates=2)
    prompt = list(range(1024))
    hashes = block_hashes(prompt, 16)
    index.apply("p3", hashes[:48], [])          # 768 tokens: not among the 2 least-loaded by rank
    index.apply("d2", hashes[:32], [])          # fewer free blocks than d1, but 512 tokens cached
    index.apply("gone", hashes, [])             # stale: no such worker, costs nothing
    first = disp.place("m", len(prompt), 16, prompt_ids=prompt, req_id="a")
    assert (first.prefill_id, first.decode_id) == ("p3", "d2")
    disp.on_start(first)
    # Load-blind placement would not look at the cache at all.
    assert Dispatcher(reg).place("m", len(prompt), 16).prefill_id in ("p1", "p2")
    assert first.prefill_tokens == 1024 - 768 and reg.get("p3").inflight_prefill_tokens == 256
    # p3's cost: its 256 uncached tokens + the prompt tokens queued there + 256 per request in
    # flight; p1 and p2 compute all 1024. One more fits (256 + 256 + 256 < 1024), then it is full.
    second = disp.place("m", len(prompt), 16, prompt_ids=prompt, req_id="b")
    assert second.prefill_id == "p3"
    disp.on_start(second)
    assert disp.place("m", len(prompt), 16, prompt_ids=prompt, req_id="c").prefill_id in ("p1", "p2")
    disp.on_prefill_done("p3", second.prefill_tokens)            # its prefill finished: room again
    assert disp.place("m", len(prompt), 16, prompt_ids=prompt, req_id="d").prefill_id == "p3"
    # A prompt with no cached prefix is placed by load alone; no ids given: the same.
    assert disp.place("m", 100, 16, prompt_ids=list(range(5000, 5100))).prefill_id in ("p1", "p2")
    reg.mark_suspect("p3")                       # never placed on a worker that may be gone
    assert disp.place("m", len(prompt), 16, prompt_ids=prompt).prefill_id != "p3"


def test_conditional_disaggregation_prefills_a_nearly_cached_prompt_on_its_decode_worker(clock):
    from pdserve.policy.prefix_cache import PrefixIndex, block_hashes
    reg = WorkerRegistry(3.0)
    for w in (make_worker("d1", Role.DECODE, 900), make_worker("d2", Role.DECODE, 800),
              make_worker("p1", Role.PREFILL), make_worker("p2", Role.PREFILL)):
        reg.register(w, clock.now_s())
    index = PrefixIndex()
    disp = Dispatcher(reg, prefix_index=index, local_prefill_max_tokens=64)
    prompt = list(range(1000))
    hashes = block_hashes(prompt, 16)
    index.apply("d2", hashes[:60], [])                    # 960 of 1000 tokens
    local = disp.place("m", len(prompt), 16, prompt_ids=prompt, req_id="a")
    assert (local.decode_id, local.prefill_id, local.kv_backend) == ("d2", None, None)
    assert local.local_prefill and not local.disaggregated and local.prefill_tokens == 40
    disp.on_start(local)
    assert reg.get("p1").num_inflight == reg.get("p2").num_inflight == 0 and reg.get("d2").num_inflight == 1
    disp.on_finish(local)
    # Off by default, and no prompt ids (no index lookup): a prefill worker computes it.
    assert Dispatcher(reg, prefix_index=index).place("m", len(prompt), 16, prompt_ids=prompt).disaggregated
    assert disp.place("m", len(prompt), 16).disaggregated
    # More than 64 tokens left uncached: a prefill worker.
    index.apply("d2", [], hashes[55:60])
    far = disp.place("m", len(prompt), 16, prompt_ids=prompt)
    assert far.disaggregated and not far.local_prefill and far.decode_id == "d2"
    # A short prompt nobody caches stays disaggregated: decode workers take only cache hits.
    assert disp.place("m", 20, 16, prompt_ids=list(range(7000, 7020))).disaggregated


def test_a_model_with_a_pool_of_its_own_runs_in_that_pools_scenario(clock):
    """IC-Cache's small model in scenario 'small-pool': its requests (classified 'default') are
    observed and placed there, so that pool's ratio controller sees them."""
    reg = WorkerRegistry(3.0)
    workers = [make_worker("L-p", Role.PREFILL, model="large"), make_worker("L-d", Role.DECODE, model="large"),
               make_worker("s-p", Role.PREFILL, model="small"), make_worker("s-d", Role.DECODE, model="small")]
    for w in workers:
        w.scenario = "small-pool" if w.model == "small" else "default"
        reg.register(w, clock.now_s())
    disp = Dispatcher(reg)
    assert disp.scenario_for("large", "default") == "default"
    assert disp.scenario_for("small", "default") == "small-pool"
    assert disp.place("small", 10, 10, scenario=disp.scenario_for("small", "default")).decode_id == "s-d"
    other = make_worker("s-d2", Role.DECODE, model="small")
    other.scenario = "elsewhere"
    reg.register(other, clock.now_s())
    assert disp.scenario_for("small", "default") == "default"    # two pools: no single answer
    assert disp.scenario_for("unknown", "default") == "default"
    assert disp.scenario_for("large", "code") == "code"         # no pool of its own: it borrows every worker


def test_a_worker_whose_batch_is_full_is_passed_over(clock):
    """A decode worker admits at most the max_batch_size it registered with. The router counts what
    it placed there: a full one, however much KV it has free, would refuse, so the request goes to
    one with a slot; with none left it is refused at once; a finished request frees a slot."""
    reg = WorkerRegistry(3.0)
    for wid, free in (("d1", 90), ("d2", 40)):
        w = make_worker(wid, Role.DECODE, free)
        w.max_batch_size = 1
        reg.register(w, clock.now_s())
    reg.register(make_worker("p", Role.PREFILL), clock.now_s())
    disp = Dispatcher(reg)
    first = disp.place("m", 20, 20, req_id="r1")
    disp.on_start(first)
    second = disp.place("m", 20, 20, req_id="r2")
    disp.on_start(second)
    assert (first.decode_id, second.decode_id) == ("d1", "d2")
    with pytest.raises(NoCapacity):
        disp.place("m", 20, 20, req_id="r3")
    disp.on_prefill_done(first.prefill_id, first.prefill_tokens)
    disp.on_finish(first)
    assert disp.place("m", 20, 20, req_id="r3").decode_id == "d1"
