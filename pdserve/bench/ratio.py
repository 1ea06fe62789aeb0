"""`pdserve bench ratio`: dynamic per-scenario P/D ratios vs the best single static ratio.

Workload: the merged Azure 2023 traces as two scenarios (conv: chatty, decode-heavier; code:
bursty, prefill-heavy), the first `minutes` of each, replayed `speedup` times faster so the
simulated fleet is loaded. Fleet: two worker groups (one per scenario) on a hardware preset.
Dynamic: each group starts at an even split and the RatioController moves it (drain, then
switch). Static: every split p:(G-p) for both groups, the best one reported. Goodput counts
requests meeting both their TTFT and TPOT SLOs, per second of trace.
"""
from __future__ import annotations

import pathlib

from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.scenarios import ScenarioClassifier, ScenarioSpec
from pdserve.sim.engine import SimRequest, Simulation
from pdserve.sim.hardware import PRESETS
from pdserve.traces import load_azure

SCENARIOS = {
    "conv": ScenarioSpec("conv", ttft_slo_ms=1000, tpot_slo_ms=50, header_values=("conv",)),
    "code": ScenarioSpec("code", ttft_slo_ms=2000, tpot_slo_ms=50, header_values=("code",)),
}


def workload(minutes: float, speedup: float, shared: pathlib.Path | None = None) -> list[SimRequest]:
    out = []
    for kind in ("conv", "code"):
        for i, t in enumerate(load_azure(kind, shared)):
            if t.arrival_s > minutes * 60:
                break
            out.append(SimRequest(f"{kind}-{i}", kind, t.arrival_s / speedup, t.input_tokens, max(1, t.output_tokens)))
    return sorted(out, key=lambda r: (r.arrival_s, r.req_id))


def _goodput(reqs: list[SimRequest]) -> dict:
    span = max(r.arrival_s for r in reqs) - min(r.arrival_s for r in reqs)
    met = sum(r.met_slo() for r in reqs)
    per = {s: round(sum(r.met_slo() for r in reqs if r.scenario == s) / max(1, sum(r.scenario == s for r in reqs)), 3)
           for s in SCENARIOS}
    return {"goodput_rps": round(met / span, 3), "attainment": round(met / len(reqs), 3), "attainment_by_scenario": per,
            "rejected": sum(r.rejected for r in reqs)}


def run(minutes: float = 30, speedup: float = 10, workers_per_group: int = 8, hardware: str = "llama3-8b-h100",
        shared: pathlib.Path | None = None) -> dict:
    hw = PRESETS[hardware]
    classifier = ScenarioClassifier(dict(SCENARIOS))
    g = workers_per_group
    static = []
    for p in range(1, g):
        sim = Simulation(hw, {s: (p, g - p) for s in SCENARIOS}, classifier, None)
        static.append({"ratio": f"{p}:{g - p}", **_goodput(sim.run(workload(minutes, speedup, shared)))})
    best = max(static, key=lambda r: r["goodput_rps"])
    controller = RatioController(ControllerConfig(window_s=20.0, cooldown_s=10.0, hysteresis=0.2, max_step=1))
    sim = Simulation(hw, {s: (g // 2, g - g // 2) for s in SCENARIOS}, classifier, controller, control_interval_s=2.0)
    dynamic = _goodput(sim.run(workload(minutes, speedup, shared)))
    final = {grp: f"{p}:{d}" for _, grp, p, d in sim.ratio_log}
    return {"hardware": hardware, "minutes": minutes, "speedup": speedup, "workers_per_group": g,
            "num_requests": len(workload(minutes, speedup, shared)), "static": static, "best_static": best,
            "dynamic": {**dynamic, "final_ratios": final, "num_ratio_changes": len(sim.ratio_log) - len(SCENARIOS),
                        "ratio_log": [{"t_s": round(t, 1), "scenario": grp, "prefill": p, "decode": d}
                                      for t, grp, p, d in sim.ratio_log]},
            "goodput_ratio_dynamic_vs_best_static": round(dynamic["goodput_rps"] / max(best["goodput_rps"], 1e-9), 3)}
