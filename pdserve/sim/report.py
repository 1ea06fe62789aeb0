"""Summaries of simulated requests: goodput, SLO attainment, TTFT/TPOT percentiles."""
from __future__ import annotations

from pdserve.sim.fleet import SimRequest


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)


def summarize(reqs: list[SimRequest]) -> dict:
    span = max(r.arrival_s for r in reqs) - min(r.arrival_s for r in reqs)
    met = sum(r.met_slo() for r in reqs)
    done = [r for r in reqs if r.finish_s is not None and r.first_token_s is not None]
    ttft = [r.first_token_s - r.arrival_s for r in done]
    tpot = [(r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    scenarios = sorted({r.scenario for r in reqs if r.scenario})
    return {
        "goodput_rps": round(met / max(span, 1e-9), 3), "attainment": round(met / len(reqs), 3),
        "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
        "tpot_p50_ms": _pct(tpot, 0.5), "tpot_p99_ms": _pct(tpot, 0.99),
        "rejected": sum(r.rejected for r in reqs),
        "attainment_by_scenario": {s: round(sum(r.met_slo() for r in reqs if r.scenario == s)
                                            / max(1, sum(r.scenario == s for r in reqs)), 3) for s in scenarios},
    }
