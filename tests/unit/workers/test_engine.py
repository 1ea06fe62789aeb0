"""The decode engine: paged decode equals recomputation, batching changes nothing, and a pool that
runs out at a block boundary preempts the newest sequence instead of failing the batch."""
import pytest

from pdserve.workers.engine import Engine
from pdserve.workers.kv_cache import OutOfKVBlocks
from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import OperatorKind, PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.model.loader import LoadedModel
from pdserve.workers.model.sampling import sample_token
from pdserve.workers.model.tokenizer import ByteTokenizer
from tests.conftest import assert_no_leaks, make_sampling


def _tiny() -> LoadedModel:
    cfg = tiny_config()
    return LoadedModel("tiny", LlamaModel(cfg, random_weights(cfg, 0)), ByteTokenizer())


def start_local(engine: Engine, req_id: str, prompt: list[int], params) -> list[int]:
    """What a worker does for a local prompt: admit, prefill (here directly), import, join."""
    engine.admit(req_id, len(prompt))
    execution = PrefillExecution(engine.model, prompt)
    layers = []
    while not execution.done:
        op = execution.step()
        if op.kind is OperatorKind.ATTENTION:
            layers.append(op.layer_kv)
    delta = engine.start(req_id, prompt, layers, params, sample_token(execution.logits, params, 0))
    if delta.finish is not None:
        engine.release(req_id)
    return list(delta.token_ids)


def run_to_completion(engine: Engine) -> dict[str, list[int]]:
    """Step until no sequence is left; release each as it finishes, as the worker's lifecycle does."""
    out: dict[str, list[int]] = {}
    while engine.has_work:
        for rid, delta in engine.step().items():
            out.setdefault(rid, []).extend(delta.token_ids)
            if delta.finish is not None:
                engine.release(rid)
    return out


def test_engine_decode_matches_full_recompute_greedy():
    loaded = _tiny()
    engine = Engine(loaded, num_kv_blocks=64, block_size_tokens=4, max_batch_size=4)
    prompt = loaded.tokenizer.encode("paged attention check")
    tokens = start_local(engine, "r1", prompt, make_sampling(max_tokens=10, ignore_eos=True))
    tokens += run_to_completion(engine)["r1"]
    expected, ids = [], list(prompt)
    for _ in range(10):
        nxt = int(PrefillExecution(loaded.model, ids).run_to_end().argmax())
        expected.append(nxt)
        ids.append(nxt)
    assert tokens == expected
    assert_no_leaks(allocator=engine.allocator)


def test_batched_decode_equals_one_at_a_time():
    loaded = _tiny()
    prompts = [loaded.tokenizer.encode(t) for t in ("a", "a longer prompt here", "mid size")]

    def run(batch: bool) -> list[list[int]]:
        engine = Engine(loaded, num_kv_blocks=64, block_size_tokens=4, max_batch_size=8)
        outs = {}
        order = [prompts] if batch else [[p] for p in prompts]
        for group in order:
            for i, p in enumerate(group):
                rid = f"r{prompts.index(p)}"
                outs[rid] = start_local(engine, rid, p, make_sampling(max_tokens=6, ignore_eos=True))
            for rid, more in run_to_completion(engine).items():
                outs[rid] += more
        assert_no_leaks(allocator=engine.allocator)
        return [outs[f"r{i}"] for i in range(len(prompts))]

    assert run(batch=True) == run(batch=False)


@pytest.mark.parametrize("params", [make_sampling(max_tokens=20, ignore_eos=True),
                                    make_sampling(max_tokens=20, ignore_eos=True, temperature=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_two_sequences_at_a_block_boundary_with_one_free_block_both_finish(params):
    loaded = _tiny()
    prompts = {"old": list(range(40, 70)), "new": list(range(100, 130))}    # 30 tokens: 2 blocks each

    def run(num_kv_blocks: int) -> tuple[dict[str, list[int]], Engine]:
        engine = Engine(loaded, num_kv_blocks=num_kv_blocks, block_size_tokens=16, max_batch_size=4)
        out = {rid: start_local(engine, rid, p, params) for rid, p in prompts.items()}
        for rid, more in run_to_completion(engine).items():
            out[rid] += more
        assert_no_leaks(allocator=engine.allocator)
        return out, engine

    reference, unconstrained = run(num_kv_blocks=64)
    assert unconstrained.stats.num_preemptions == 0
    # 5 blocks: both prompts hold 2 each and one is free when both cross 32 tokens at the same step.
    got, constrained = run(num_kv_blocks=5)
    assert constrained.stats.num_preemptions == 1 and constrained.stats.num_resumes == 1
    assert got == reference and all(len(t) == 20 for t in got.values())


def test_a_finished_answers_blocks_serve_the_next_turns_prompt_and_change_nothing():
    """The decode-generated full blocks are named at the end: a next turn that repeats prompt and
    answer links them (prompt blocks and answer blocks) and decodes exactly what a cold run does."""
    loaded = _tiny()
    warm = Engine(loaded, num_kv_blocks=64, block_size_tokens=4, max_batch_size=4, prefix_caching=True)
    params = make_sampling(max_tokens=12, ignore_eos=True)
    prompt = loaded.tokenizer.encode("first turn")
    answer = start_local(warm, "t1", prompt, params) + run_to_completion(warm)["t1"]
    assert warm.allocator.num_cached_blocks >= (len(prompt) + len(answer) - 1) // 4
    next_prompt = prompt + answer + loaded.tokenizer.encode(" and then?")
    cached = warm.admit("t2", len(next_prompt), next_prompt)
    # Everything up to the answer's last token (whose KV a finished request never writes) is cached.
    assert cached == (len(prompt) + len(answer) - 1) // 4 * 4 > len(prompt)
    layers = [kv[:, cached:] for kv in _prefill_layers(loaded, next_prompt)]
    first = int(PrefillExecution(loaded.model, next_prompt).run_to_end().argmax())
    delta = warm.start("t2", next_prompt, layers, params, first, layers_start_tokens=cached)
    warm_tokens = list(delta.token_ids) + run_to_completion(warm)["t2"]
    warm.release("t2")

    cold = Engine(loaded, num_kv_blocks=64, block_size_tokens=4, max_batch_size=4)
    cold_tokens = start_local(cold, "t2", next_prompt, params) + run_to_completion(cold)["t2"]
    assert warm_tokens == cold_tokens
    assert_no_leaks(allocator=cold.allocator)


def _prefill_layers(loaded: LoadedModel, ids: list[int]) -> list:
    execution, layers = PrefillExecution(loaded.model, ids), []
    while not execution.done:
        op = execution.step()
        if op.kind is OperatorKind.ATTENTION:
            layers.append(op.layer_kv)
    return layers


def test_admission_refusals_name_the_limit_reached():
    """A refused admission says which limit it hit: the router passes the reason on to the client."""
    engine = Engine(_tiny(), num_kv_blocks=4, block_size_tokens=16, max_batch_size=2)
    engine.admit("a", 10)
    with pytest.raises(OutOfKVBlocks, match=r"no room for 60 more tokens' KV \(3 free blocks\)"):
        engine.admit("big", 60)
    engine.admit("b", 10)
    with pytest.raises(OutOfKVBlocks, match=r"its batch is full \(2/2 sequences\)"):
        engine.admit("c", 10)
    for req_id in ("a", "b"):
        engine.release(req_id)
    assert engine.allocator.num_free_blocks == 4
