"""Admission runs on the worker's event loop while the compute thread steps the batch (the engine's
`books` lock): the block bookkeeping stays consistent, and the running sequences produce the tokens
they produce without concurrent admissions."""
import queue
import sys
import threading
from collections import Counter

from pdserve.workers.engine import Engine
from pdserve.workers.kv_cache import OutOfKVBlocks
from tests.conftest import assert_no_leaks, make_sampling
from tests.unit.workers.test_engine import _tiny, run_to_completion, start_local

PROMPTS = {"r1": list(b"shared system prompt, then the first question"),
           "r2": list(b"shared system prompt, then another question!")}


def _check_books(engine: Engine) -> None:
    """Every block is free, cached-unowned or owned, once; its count is the tables listing it."""
    alloc = engine.allocator
    owners = Counter(b for rid in list(alloc._tables) for b in alloc.table(rid))
    free, evictable = set(alloc._free_block_ids), set(alloc._evictable)
    assert len(free) == len(alloc._free_block_ids), "a block is free twice"
    assert not (free & evictable or free & owners.keys() or evictable & owners.keys())
    assert len(free) + len(evictable) + len(owners) == alloc.num_blocks
    assert all(alloc.ref_count(b) == owners[b] for b in range(alloc.num_blocks))


def _decode(engine: Engine, params) -> dict[str, list[int]]:
    out = {rid: start_local(engine, rid, prompt, params) for rid, prompt in PROMPTS.items()}
    for rid, tokens in run_to_completion(engine).items():
        out[rid] += tokens
    return out


def test_admissions_beside_decode_steps_keep_the_books_and_the_tokens():
    params = make_sampling(max_tokens=60, ignore_eos=True)
    # Few blocks: admissions take the blocks steps need, so steps preempt and resume sequences.
    new = lambda: Engine(_tiny(), num_kv_blocks=40, block_size_tokens=4, max_batch_size=6,  # noqa: E731
                         prefix_caching=True)
    reference = _decode(new(), params)

    engine = new()
    admitted: queue.Queue[str] = queue.Queue()
    go, counts = threading.Semaphore(0), Counter()

    def admit_per_step() -> None:
        """One admission as each step begins, so it meets the step planning or computing."""
        i = 0
        while go.acquire() and (i := i + 1) > 0:
            if counts["stop"]:
                return
            prompt = PROMPTS["r1"][:24] + [i % 256] * (8 + i % 24)     # shares cached blocks with r1
            try:
                engine.admit(f"a{i}", len(prompt), prompt)
                admitted.put(f"a{i}")
                counts["admitted"] += 1
            except OutOfKVBlocks:
                counts["refused"] += 1

    out = {rid: start_local(engine, rid, prompt, params) for rid, prompt in PROMPTS.items()}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)     # switch threads more often than every 5 ms
    admitter = threading.Thread(target=admit_per_step)
    admitter.start()
    try:
        while engine.has_work:
            go.release()
            for rid, delta in engine.step().items():
                out[rid] += delta.token_ids
                if delta.finish is not None:
                    engine.release(rid)
            # Admissions made during the step held their blocks through it; the compute thread
            # releases them, as the worker's lifecycle does (a reservation imports or expires).
            while not admitted.empty():
                engine.release(admitted.get())
    finally:
        counts["stop"] = 1
        go.release()
        admitter.join()
        sys.setswitchinterval(interval)
    _check_books(engine)
    while not admitted.empty():
        engine.release(admitted.get())
    assert out == reference
    assert counts["admitted"] > 10 and counts["refused"] > 0, counts
    assert engine.stats.num_preemptions > 0
    _check_books(engine)
    assert_no_leaks(allocator=engine.allocator)


def test_an_admission_during_a_step_cannot_take_the_blocks_the_step_planned():
    """A step plans on the free-block count and then takes its slots; an admission arriving in
    between (held open here by a hook right after planning) waits until the slots are taken, then
    finds the pool full, instead of taking the block the plan counted on."""
    engine = Engine(_tiny(), num_kv_blocks=3, block_size_tokens=4, max_batch_size=4)
    start_local(engine, "r1", list(b"seven t"), make_sampling(max_tokens=20, ignore_eos=True))
    engine.step()           # 8 tokens of KV now: the next step needs r1's third block, the last free one
    assert engine.allocator.num_free_blocks == 1
    outcome: list[str] = []
    admissions: list[threading.Thread] = []

    def admit() -> None:
        try:
            engine.admit("late", 3)
            outcome.append("admitted")
        except OutOfKVBlocks:
            outcome.append("refused")

    plan = engine.scheduler.schedule

    def plan_then_admit(*args):
        result = plan(*args)
        late = threading.Thread(target=admit)
        admissions.append(late)
        late.start()
        late.join(0.5)      # long enough for an unguarded admission to take the block
        return result
    engine.scheduler.schedule = plan_then_admit
    deltas = engine.step()
    engine.scheduler.schedule = plan
    admissions[0].join()    # it ends once the step has left the lock
    assert outcome == ["refused"] and len(deltas["r1"].token_ids) == 1
    engine.release("r1")
    _check_books(engine)
    assert_no_leaks(allocator=engine.allocator)


def test_only_a_request_outside_the_batch_is_released_off_the_compute_thread():
    engine = Engine(_tiny(), num_kv_blocks=16, block_size_tokens=4, max_batch_size=4)
    start_local(engine, "running", list(b"a prompt"), make_sampling(max_tokens=20, ignore_eos=True))
    engine.admit("waiting", 6)
    assert not engine.release_if_idle("running")       # a step may be using its blocks
    assert engine.allocator.holds("running")
    assert engine.release_if_idle("waiting") and not engine.allocator.holds("waiting")
    engine.release("running")
    _check_books(engine)
    assert_no_leaks(allocator=engine.allocator)
