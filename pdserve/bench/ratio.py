"""`pdserve bench ratio`: dynamic per-scenario P/D ratios vs the best single static ratio.

Workload: the merged Azure 2023 traces as two scenarios (conv: chatty, decode-heavier; code:
bursty, prefill-heavy), the first `minutes` of each, replayed `speedup` times faster so the
simulated fleet is loaded. Fleet: two scenarios with their own workers on a hardware preset.
Dynamic: each scenario starts at an even split and the RatioController moves it (drain, then
switch). Static: every split p:(G-p) for both scenarios, the best one reported. Goodput counts
requests meeting both their TTFT and TPOT SLOs, per second of trace.
"""
from __future__ import annotations

import pathlib

from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.sim.compare import MOONCAKE_SCENARIOS, SCENARIOS, azure_merged, one_scenario
from pdserve.sim.fleet import Simulation
from pdserve.sim.hardware import PRESETS
from pdserve.sim.report import summarize
from pdserve.traces import load_file


def workload(minutes: float, speedup: float, trace_file: pathlib.Path | None = None):
    """The Azure traces as two scenarios, or a trace file as one."""
    if trace_file is not None:
        return one_scenario(load_file(trace_file), minutes, speedup, "f")[0]
    return azure_merged(minutes, speedup)


def run(minutes: float = 30, speedup: float = 10, workers_per_scenario: int = 8, hardware: str = "llama3-8b-h100",
        trace_file: pathlib.Path | None = None) -> dict:
    hw = PRESETS[hardware]
    scenarios = MOONCAKE_SCENARIOS if trace_file else SCENARIOS
    classifier = ScenarioClassifier(dict(scenarios))
    g = workers_per_scenario
    static = []
    for p in range(1, g):
        sim = Simulation(hw, {s: (p, g - p) for s in scenarios}, classifier, None)
        static.append({"ratio": f"{p}:{g - p}", **summarize(sim.run(workload(minutes, speedup, trace_file)))})
    best = max(static, key=lambda r: r["goodput_rps"])
    controller = RatioController(ControllerConfig(window_s=20.0, cooldown_s=10.0, hysteresis=0.2, max_step=1))
    sim = Simulation(hw, {s: (g // 2, g - g // 2) for s in scenarios}, classifier, controller, control_interval_s=2.0)
    dynamic = summarize(sim.run(workload(minutes, speedup, trace_file)))
    final = {grp: f"{p}:{d}" for _, grp, p, d in sim.ratio_log}
    return {"hardware": hardware, "minutes": minutes, "speedup": speedup, "workers_per_scenario": g,
            "num_requests": len(workload(minutes, speedup, trace_file)), "static": static, "best_static": best,
            "dynamic": {**dynamic, "final_ratios": final, "num_ratio_changes": len(sim.ratio_log) - len(scenarios),
                        "ratio_log": [{"t_s": round(t, 1), "scenario": grp, "prefill": p, "decode": d}
                                      for t, grp, p, d in sim.ratio_log]},
            "goodput_ratio_dynamic_vs_best_static": round(dynamic["goodput_rps"] / max(best["goodput_rps"], 1e-9), 3)}
