"""The real model runner under each scheduler: a preempted prefill's KV and logits are bit-exact
with an uninterrupted run, and every finished layer is delivered."""
import threading

import pytest
import torch

from pdserve.clock import WallClock
from pdserve.policy.cost_model import OperatorCostModel
from pdserve.policy.prefill_scheduler import make_scheduler
from pdserve.workers.model.config import tiny_config
from pdserve.workers.model.execution import PrefillExecution
from pdserve.workers.model.llama import LlamaModel, random_weights
from pdserve.workers.prefill_runner import PrefillRunner
from pdserve.workers.profiler import fit_cost_model


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
    logits = {name: f.result(timeout=60) for name, f in futures.items()}
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


def test_preempted_prefill_is_bit_exact(model):
    cost, _, _ = fit_cost_model(model, token_counts=(16, 64, 256, 1024), repeats=1)
    clock = WallClock()
    runner = PrefillRunner(model, make_scheduler("flowprefill", 4, cost), clock)
    long_ids = [(i * 31) % 256 for i in range(3000)]
    started = threading.Event()
    long_layers = {}

    def on_long_layer(layer, kv):
        long_layers[layer] = kv
        started.set()

    long_future = runner.submit("long", long_ids, clock.now_s() + 60, on_long_layer)
    started.wait(30)                                       # layer 0 is done: the long prefill is running
    short_future = runner.submit("short", list(range(30)), clock.now_s() + cost.prefill_s(30) * 3 + 0.05,
                                 lambda *_: None)
    short_future.result(30)
    assert not long_future.done()                          # the short one overtook it
    long_logits = long_future.result(60)
    runner.stop()
    assert runner.stats.preemption_latencies_s, "no preemption happened"
    ref = PrefillExecution(model, long_ids)
    assert torch.equal(long_logits, ref.run_to_end())      # bit-exact: nothing recomputed differently
    for layer, kv in long_layers.items():
        assert torch.equal(kv, ref.layer_kv[layer])
