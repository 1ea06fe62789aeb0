"""The real model runner under each scheduler: a preempted prefill's KV and logits are bit-exact
with an uninterrupted run, and every finished layer is delivered."""
import threading

import pytest
import torch

from pdserve.clock import WallClock
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import FlowPrefillScheduler, make_scheduler
from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.model.unit_execution import CachedPrefix
from pdserve.workers.prefill_runner import PrefillRunner, Rejected


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return LlamaModel(cfg, random_weights(cfg, 0))


def _run(model, mode, prompts, deadlines_s, cost=None, gate_first=False):
    clock = WallClock()
    sched = make_scheduler(mode, model.config.num_layers, cost or OperatorCostModel(4, (1e-4, 1e-6, 1e-10), (1e-4, 1e-6)),
                           chunk_tokens=96)
    runner = PrefillRunner(model, sched, clock)
    layers = {name: {} for name in prompts}
    futures = {}
    for name, ids in prompts.items():
        futures[name] = runner.submit(name, ids, clock.now_s() + deadlines_s[name],
                                      lambda layer, kv, name=name: layers[name].__setitem__(layer, kv))
    logits = {name: f.result(timeout=60).logits for name, f in futures.items()}
    runner.stop()
    return logits, layers, runner.stats


@pytest.mark.parametrize("mode", ["fcfs", "chunked", "flowprefill"])
def test_every_mode_matches_uninterrupted_prefill(model, mode):
    prompts = {"long": list(range(300)) * 4, "short": list(range(40, 80))}
    logits, layers, _ = _run(model, mode, prompts, {"long": 30.0, "short": 0.5})
    for name, ids in prompts.items():
        ref = PrefillExecution(model, ids)
        ref_logits = ref.run_to_end()
        torch.testing.assert_close(logits[name], ref_logits, rtol=1e-4, atol=1e-4)
        assert sorted(layers[name]) == list(range(model.config.num_layers))
        for layer, kv in layers[name].items():
            torch.testing.assert_close(kv, ref.layer_kv[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fcfs", "chunked", "flowprefill"])
def test_a_prefill_from_a_cached_prefix_matches_a_whole_one(model, mode):
    """Only the tokens after the prefix are computed (and costed); the layers delivered still
    cover the whole prompt."""
    ids = [(i * 13) % 200 for i in range(230)]
    ref = PrefillExecution(model, ids)
    ref_logits = ref.run_to_end()
    clock = WallClock()
    runner = PrefillRunner(model, make_scheduler(mode, model.config.num_layers,
                                                 OperatorCostModel(4, (1e-4, 1e-6, 1e-10), (1e-4, 1e-6)),
                                                 chunk_tokens=64), clock)
    layers = {}
    prefix = CachedPrefix.of([kv[:, :160] for kv in ref.layer_kv], len(ids))
    state = runner.submit("p", ids, clock.now_s() + 30, layers.__setitem__, prefix=prefix).result(60)
    runner.stop()
    torch.testing.assert_close(state.logits, ref_logits, rtol=1e-4, atol=1e-4)
    for layer, kv in layers.items():
        torch.testing.assert_close(kv, ref.layer_kv[layer], rtol=1e-5, atol=1e-5)
    assert sorted(layers) == list(range(model.config.num_layers))
    with pytest.raises(ValueError):          # the last token is never taken from a cache
        runner.submit("q", ids[:160], clock.now_s() + 30, layers.__setitem__, prefix=prefix)


def test_preempted_prefill_is_bit_exact():
    """The long prompt is held at its first layer until the urgent one has arrived, and the policy
    plans with a fixed cost model: preemption follows from the predictions, not from how fast this
    machine happens to be."""
    cfg = tiny_config(num_layers=16)
    model = LlamaModel(cfg, random_weights(cfg, 0))
    cost = OperatorCostModel(16, (0.0, 1e-3, 0.0), (0.0, 1e-3))   # 1 ms per token per operator
    clock = WallClock()
    runner = PrefillRunner(model, FlowPrefillScheduler(16, cost), clock)
    long_ids = [(i * 31) % 256 for i in range(2000)]
    started, go_on = threading.Event(), threading.Event()
    long_layers, finished = {}, []

    def on_long_layer(layer, kv):
        long_layers[layer] = kv
        started.set()
        go_on.wait(30)

    long_future = runner.submit("long", long_ids, clock.now_s() + 600, on_long_layer)
    long_future.add_done_callback(lambda _: finished.append("long"))
    assert started.wait(30)                                # layer 0 is done: the long prefill is running
    # The short prompt is predicted at 32 x 30 ms ~ 1 s, the long one's remaining work at 31 x 2 s:
    # with a 10 s budget the short one makes it only if it runs now.
    short_future = runner.submit("short", list(range(30)), clock.now_s() + 10.0, lambda *_: None)
    short_future.add_done_callback(lambda _: finished.append("short"))
    go_on.set()
    short_future.result(60)
    long_logits = long_future.result(120).logits
    runner.stop()
    assert finished == ["short", "long"]                   # the short one overtook it
    assert len(runner.stats.preemption_latencies_s) == 1
    ref = PrefillExecution(model, long_ids)
    assert torch.equal(long_logits, ref.run_to_end())      # bit-exact: nothing recomputed differently
    for layer, kv in long_layers.items():
        assert torch.equal(kv, ref.layer_kv[layer])


@pytest.mark.parametrize("mode", ["fcfs", "chunked", "flowprefill"])
def test_cancelled_prefill_is_dropped_or_stopped_at_an_operator_boundary(model, mode):
    """A waiting prompt leaves the queue; a running one stops at its next operator boundary (it is
    held at its first layer until cancelled, so the boundary is known) and the rest still run."""
    clock = WallClock()
    cost = OperatorCostModel(4, (1e-4, 1e-6, 1e-10), (1e-4, 1e-6))
    runner = PrefillRunner(model, make_scheduler(mode, 4, cost, chunk_tokens=256), clock)
    started, go_on = threading.Event(), threading.Event()
    first_layers = []

    def on_first_layer(layer, kv):
        first_layers.append(layer)
        started.set()
        go_on.wait(30)

    # 2048 tokens: chunked mode's last chunk of it (where layers complete) is not shared with q0.
    first = runner.submit("first", list(range(200)) * 10 + list(range(48)), clock.now_s() + 60, on_first_layer)
    queued = [runner.submit(f"q{i}", list(range(100)), clock.now_s() + 60, lambda *_: None) for i in range(2)]
    assert started.wait(30)
    assert runner.cancel("q1") and queued[1].cancelled()       # waiting: dropped from the queue
    assert runner.cancel("first")                              # running: stops at the next boundary
    go_on.set()
    queued[0].result(60)
    assert first.cancelled()
    assert first_layers == [0]                                 # no operator ran after the cancel
    assert runner.stats.num_abandoned == 1
    assert not runner.cancel("first")                          # gone: nothing left to cancel
    runner.stop()
    assert runner.num_pending == 0


def test_full_queue_refuses_at_once(model):
    clock = WallClock()
    runner = PrefillRunner(model, make_scheduler("fcfs", 4), clock, max_pending=2)
    started, go_on = threading.Event(), threading.Event()
    held = runner.submit("held", list(range(100)), clock.now_s() + 60,
                         lambda *_: (started.set(), go_on.wait(30)))
    assert started.wait(30)
    queued = runner.submit("queued", list(range(100)), clock.now_s() + 60, lambda *_: None)
    with pytest.raises(Rejected, match="already queued"):
        runner.submit("third", list(range(100)), clock.now_s() + 60, lambda *_: None)
    go_on.set()
    held.result(60)
    queued.result(60)
    runner.submit("after", list(range(100)), clock.now_s() + 60, lambda *_: None).result(60)   # room again
    runner.stop()
    assert runner.stats.num_rejected == 1


@pytest.mark.parametrize("mode", ["fcfs", "chunked"])
def test_prompt_logprobs_match_one_prefill_per_position(model, mode):
    """Every prompt token's logprob (echo + logprobs) equals the last-position logits of a prefill
    of the prompt up to it, also when chunked prefill splits the prompt into pieces."""
    ids = [(7 * i + 3) % 250 for i in range(150)]        # 150 tokens: two pieces at 96 per chunk
    sched = make_scheduler(mode, model.config.num_layers, chunk_tokens=96)
    runner = PrefillRunner(model, sched, WallClock())
    state = runner.submit("r", ids, WallClock().now_s() + 60, lambda *_: None, prompt_top=3).result(60)
    runner.stop()
    assert len(state.prompt_logprobs) == len(ids) - 1
    for i in (0, 1, 95, 96, 148):                           # both sides of the chunk boundary
        ref = torch.log_softmax(PrefillExecution(model, ids[:i + 1]).run_to_end().float(), dim=-1)
        got = state.prompt_logprobs[i]
        assert got.token_id == ids[i + 1]
        assert got.logprob == pytest.approx(float(ref[ids[i + 1]]), abs=1e-4)
        assert [t for t, _ in got.top] == torch.topk(ref, 3).indices.tolist()
