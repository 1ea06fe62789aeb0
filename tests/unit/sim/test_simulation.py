"""The simulator drives the router's policy objects deterministically on virtual time."""
import copy

from pdserve.bench import ratio
from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.sim.fleet import SimRequest, Simulation
from pdserve.sim.hardware import LLAMA3_8B_H100


def _prefill_heavy(n: int) -> list[SimRequest]:
    return [SimRequest(f"r{i}", "code", i * 0.05, 6000, 4) for i in range(n)]


def test_same_input_gives_the_same_result():
    runs = []
    for _ in range(2):
        reqs = ratio.workload(minutes=3, speedup=4)
        sim = Simulation(LLAMA3_8B_H100, {"conv": (4, 4), "code": (4, 4)}, ScenarioClassifier(dict(ratio.SCENARIOS)),
                         RatioController(ControllerConfig(window_s=20, cooldown_s=10)), control_interval_s=2.0)
        done = sim.run(reqs)
        runs.append(([(r.first_token_s, r.finish_s) for r in done], sim.ratio_log))
    assert runs[0] == runs[1]


def test_controller_moves_a_prefill_bound_group_towards_prefill_and_helps():
    classifier = ScenarioClassifier(dict(ratio.SCENARIOS))
    static = Simulation(LLAMA3_8B_H100, {"code": (1, 7)}, classifier, None).run(_prefill_heavy(600))
    sim = Simulation(LLAMA3_8B_H100, {"code": (1, 7)}, classifier,
                     RatioController(ControllerConfig(window_s=5, cooldown_s=2)), control_interval_s=1.0)
    dynamic = sim.run(_prefill_heavy(600))
    assert sim.ratio_log[-1][2] > 1                         # more prefill workers than it started with
    assert sum(r.met_slo() for r in dynamic) > sum(r.met_slo() for r in static)
    # Role changes drained: every placed request finished. (Some are refused at arrival: queued
    # prefills hold their prompts' KV on the decode workers, as ReserveKV does live.)
    assert all(r.finish_s is not None for r in dynamic if not r.rejected)


def test_routing_baselines_pick_as_documented():
    from pdserve.policy.baseline_routers import LeastLoaded, PowerOfTwo, PrefixAware, RoundRobin, WorkerLoad

    ws = [WorkerLoad("a", 3, {1, 2}), WorkerLoad("b", 1, set()), WorkerLoad("c", 2, {1})]
    assert [RoundRobin().pick(ws).worker_id for _ in range(1)] == ["a"]
    assert LeastLoaded().pick(ws).worker_id == "b"
    assert PrefixAware().pick(ws, (1, 2, 9)).worker_id == "a"                  # longest cached prefix
    assert PrefixAware(balance_threshold=1).pick(ws, (1, 2)).worker_id == "b"  # too loaded: balance
    picks = [PowerOfTwo(seed=3).pick(ws).worker_id for _ in range(3)]
    assert picks == [PowerOfTwo(seed=3).pick(ws).worker_id for _ in range(3)]


def test_mooncake_loader_keeps_block_hashes():
    from pdserve.traces import load_mooncake

    reqs = load_mooncake("conversation", limit=50)
    assert reqs[0].arrival_s == 0.0 and reqs[0].block_hashes[:2] == (0, 1)
    assert all(len(r.block_hashes) >= r.input_tokens // 512 for r in reqs)


def test_sim_report_is_deterministic_and_compares_every_baseline():
    import json

    from pdserve.sim import compare

    a = json.dumps(compare.run(minutes=2, speedup=4, workers_per_scenario=4), sort_keys=True)
    b = json.dumps(compare.run(minutes=2, speedup=4, workers_per_scenario=4), sort_keys=True)
    assert a == b
    ratios = json.loads(a)["goodput_ratio_pdserve_vs"]
    routers = ("round-robin", "least-loaded", "power-of-two", "prefix-aware")
    assert set(ratios) == {"static-best", "static-best-flowprefill", *(f"aggregated-{r}" for r in routers),
                           *(f"aggregated-chunked-{r}" for r in routers)}
    chunked = json.loads(a)["results"]["aggregated-chunked-least-loaded"]
    assert chunked["chunk_tokens"] in compare.CHUNK_TOKENS


def test_mooncake_workload_feeds_block_hashes_to_prefix_aware_routing():
    from pdserve.sim import compare

    reqs, hashes = compare.mooncake(minutes=1, speedup=1)
    assert reqs and all(hashes[r.req_id] for r in reqs)
    report = compare.run(minutes=1, speedup=1, workers_per_scenario=2, trace="mooncake")
    assert report["workload"].startswith("mooncake") and report["num_workers"] == 4
    cached = report["results"]["pdserve-prefix-cache"]
    assert report["pdserve_configuration"] == "pdserve-prefix-cache" and cached["prefix_hit_rate"] > 0
    assert "pdserve" in report["goodput_ratio_pdserve_vs"]
    assert report["strongest_baseline"] in report["goodput_ratio_pdserve_vs"]


def test_simulated_prefill_caches_skip_cached_prefixes_and_routing_finds_them():
    """Same trace, same fleet: caches cut prefill work; cache-aware placement raises the hit rate
    over load-only placement (the router's own Dispatcher and PrefixIndex decide)."""
    import copy

    from pdserve.policy.scenarios import ScenarioClassifier
    from pdserve.sim import compare
    from pdserve.sim.fleet import Simulation
    from pdserve.sim.hardware import PRESETS

    reqs, hashes = compare.mooncake(minutes=3, speedup=1)
    classifier = ScenarioClassifier(dict(compare.MOONCAKE_SCENARIOS))
    runs = {}
    for name, caching, aware in (("none", False, False), ("load", True, False), ("aware", True, True)):
        sim = Simulation(PRESETS["llama3-8b-h100"], {"default": (4, 4)}, classifier, None,
                         prefill_policy="flowprefill", forwarding=True, block_hashes=hashes,
                         prefix_caching=caching, cache_aware=aware)
        sim.run(copy.deepcopy(reqs))
        runs[name] = sim
    assert runs["none"].prefix_hit_rate() is None
    assert 0 < runs["load"].prefix_hit_rate() < runs["aware"].prefix_hit_rate()
    assert runs["aware"].prefill_busy_s < runs["none"].prefill_busy_s


def test_simulated_decode_caches_link_a_held_prefix_so_only_the_rest_crosses_the_wire():
    from pdserve.sim import compare
    from pdserve.sim.hardware import PRESETS

    classifier = ScenarioClassifier(dict(compare.MOONCAKE_SCENARIOS))
    # Two turns of one chat (4 trace blocks of 512 tokens each), the second long after the first
    # ended, and an unrelated prompt: on a 1P+1D fleet all three meet the same decode worker.
    reqs = [SimRequest("a", "", 0.0, 2048, 8), SimRequest("b", "", 30.0, 2048, 8), SimRequest("c", "", 60.0, 1024, 8)]
    hashes = {"a": (1, 2, 3, 4), "b": (1, 2, 3, 5), "c": (9, 8)}
    sims = {}
    for caching in (False, True):
        sim = sims[caching] = Simulation(PRESETS["llama3-8b-h100"], {"default": (1, 1)}, classifier, None,
                                         prefill_policy="flowprefill", forwarding=True, block_hashes=hashes,
                                         prefix_caching=caching, cache_aware=caching)
        done = sim.run(copy.deepcopy(reqs))
        assert all(r.finish_s is not None for r in done)
    assert sims[False].kv_transfer()["tokens_linked_at_decode"] == 0
    assert sims[True].kv_transfer() == {"tokens_sent": 2048 + 512 + 1024, "tokens_linked_at_decode": 1536,
                                        "linked_share": round(1536 / 5120, 4)}
    decode = next(w for w in sims[True].workers.values() if w.rec.role.name == "DECODE")
    assert not any(decode.cache.holds(r) for r in "abc")          # every request gave its blocks back
    assert decode.cache.num_cached_blocks == 4 + 1 + 2               # prompts' full blocks stay cached


def test_conditional_disaggregation_prefills_on_the_decode_worker_and_stalls_its_batch():
    import pytest

    from pdserve.sim import compare
    from pdserve.sim.hardware import HardwareProfile

    # 1,000 prefill tokens/s + 5 ms; a decode step 10 ms + 1 ms per sequence; transfers ~free.
    # An 8B model's KV per token, so the pool has a realistic number of blocks.
    hw = HardwareProfile("toy", prefill_base_s=0.005, prefill_tokens_per_s=1000.0, prefill_quad_s=0.0,
                         decode_step_base_s=0.010, decode_step_per_seq_s=0.001, kv_bytes_per_token=131072,
                         interconnect_bytes_per_s=1e18)
    classifier = ScenarioClassifier(dict(compare.MOONCAKE_SCENARIOS))
    # "b" repeats "a"'s four blocks and adds 100 tokens while "x" decodes on the only decode worker.
    reqs = [SimRequest("a", "", 0.0, 2048, 2), SimRequest("x", "", 5.0, 512, 1001),
            SimRequest("b", "", 10.0, 2148, 2)]
    hashes = {"a": (1, 2, 3, 4), "x": (7,), "b": (1, 2, 3, 4, 5)}
    runs, sims = {}, {}
    for limit in (0, 512):
        sims[limit] = Simulation(hw, {"default": (1, 1)}, classifier, None, prefill_policy="flowprefill",
                                 forwarding=True, block_hashes=hashes, prefix_caching=True, cache_aware=True,
                                 local_prefill_max_tokens=limit)
        runs[limit] = {r.req_id: r for r in sims[limit].run(copy.deepcopy(reqs))}
    assert sims[0].num_local_prefills == 0 and sims[512].num_local_prefills == 1
    local, remote = runs[512], runs[0]
    assert local["b"].first_token_s == pytest.approx(10.0 + 0.005 + 0.1)      # 100 tokens on the decode worker
    assert all(r.finish_s is not None for r in local.values())
    # Nothing crossed the wire for "b": its 2,048 cached tokens were linked, the rest computed there.
    assert sims[512].kv_transfer()["tokens_sent"] == 2048 + 512
    assert sims[0].kv_transfer()["tokens_sent"] == 2048 + 512 + 100
    # "x" lost exactly the local prefill's time: its decode steps stopped meanwhile.
    assert local["x"].finish_s - remote["x"].finish_s == pytest.approx(0.105, abs=1e-4)
