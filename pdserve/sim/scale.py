"""`pdserve sim --workers N`: a fleet-scale run to show the policies keep up.

One hour of the merged Azure traces, each request replicated `copies` times with a small
deterministic offset (so arrivals keep the trace's shape and burstiness at a higher rate),
replayed on N workers split between the two scenarios with the ratio controller on.
Reports wall time, simulated requests, prefill utilisation and the policy's own decision cost
per dispatch (wall-clock microseconds inside Dispatcher.place).
"""
from __future__ import annotations

import math
import time

from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.scenarios import ScenarioClassifier
from pdserve.sim.compare import SCENARIOS, azure_merged
from pdserve.sim.fleet import SimRequest, Simulation
from pdserve.sim.hardware import PRESETS
from pdserve.sim.report import summarize

_COPY_OFFSET_S = 0.0137   # spreads the copies of one request over a fraction of a second


def replicated(base: list[SimRequest], copies: int) -> list[SimRequest]:
    out = []
    for c in range(copies):
        offset = (c * _COPY_OFFSET_S) % 1.0
        out += [SimRequest(f"{r.req_id}.{c}", r.scenario_header, r.arrival_s + offset, r.input_tokens,
                           r.output_tokens) for r in base]
    return sorted(out, key=lambda r: (r.arrival_s, r.req_id))


def run(num_workers: int, min_requests: int = 1_000_000, minutes: float = 60, hardware: str = "llama3-8b-h100",
        speedup: float = 100.0, progress=None) -> dict:
    """`speedup` compresses the hour so that the fleet is loaded: a real hour at this request
    count would leave 10,000 workers ~99% idle."""
    wall_start = time.perf_counter()
    base = azure_merged(minutes, speedup)
    copies = max(1, math.ceil(min_requests / len(base)))
    reqs = replicated(base, copies)
    per_scenario = num_workers // len(SCENARIOS)
    prefill = max(1, int(per_scenario * 0.8))   # both traces are prefill-bound; the controller adjusts
    sim = Simulation(PRESETS[hardware], {s: (prefill, per_scenario - prefill) for s in SCENARIOS},
                     ScenarioClassifier(dict(SCENARIOS)),
                     RatioController(ControllerConfig(window_s=3600 / speedup / 10, cooldown_s=3600 / speedup / 30)),
                     control_interval_s=3600 / speedup / 60, heartbeat_s=1.0, prefill_policy="flowprefill",
                     forwarding=True)
    if progress:
        progress(f"{len(reqs):,} requests on {num_workers:,} workers ...")
    sim.run(reqs)
    wall_s = time.perf_counter() - wall_start
    span_s = reqs[-1].arrival_s - reqs[0].arrival_s
    report = summarize(reqs)
    return {"num_workers": num_workers, "num_requests": len(reqs), "trace_minutes": minutes, "copies": copies,
            "speedup": speedup, "simulated_span_s": round(span_s, 1),
            "wall_s": round(wall_s, 1), "decision_us_per_dispatch": round(1e6 * sim.dispatch_wall_s
                                                                           / max(sim.num_dispatches, 1), 2),
            "prefill_utilisation": round(sim.prefill_busy_s / max(1.0, span_s * sum(
                1 for w in sim.workers.values() if w.rec.role.value == "prefill")), 3),
            "ratio_changes": len(sim.ratio_log) - len(SCENARIOS), **report}
