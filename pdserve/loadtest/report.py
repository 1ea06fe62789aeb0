"""The load test's summary: per scenario (and all together) what was sent, what completed, what
failed and why, SLO attainment, goodput, latency percentiles, and the arrival rate achieved
against the one intended (a client that cannot keep up shows as lateness, not as a slower trace)."""
from __future__ import annotations

import math
import pathlib
from dataclasses import asdict, dataclass, field

from pdserve.loadtest.workload import Slo


@dataclass
class Outcome:
    """One request as the client saw it. Times are seconds since the replay started."""
    index: int
    scenario: str
    intended_s: float
    sent_s: float
    input_tokens: int
    max_tokens: int
    status: str = "pending"           # "ok", an HTTP status code, "stream_error", "connection", ...
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0
    prompt_tokens_reported: int | None = None
    error: str = ""
    token_times_s: list[float] = field(default_factory=list, repr=False)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.sent_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) * 1e3 / (self.output_tokens - 1)

    @property
    def e2e_ms(self) -> float | None:
        return None if self.end_s is None else (self.end_s - self.sent_s) * 1e3

    def met(self, slo: Slo) -> bool:
        return (self.status == "ok" and self.ttft_ms is not None and self.ttft_ms <= slo.ttft_ms
                and (self.tpot_ms is None or self.tpot_ms <= slo.tpot_ms))

    def record(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "token_times_s"}
        return {**row, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 2)   # noqa: E731 nearest rank
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def _group(outcomes: list[Outcome], slos: dict[str, Slo], duration_s: float) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    failed: dict[str, int] = {}
    for o in outcomes:
        if o.status != "ok":
            failed[o.status] = failed.get(o.status, 0) + 1
    met = sum(o.met(slos[o.scenario]) for o in outcomes)
    sent = [o.sent_s for o in outcomes]
    intended = [o.intended_s for o in outcomes]
    lateness_ms = [(o.sent_s - o.intended_s) * 1e3 for o in outcomes]
    return {
        "sent": len(outcomes), "completed": len(ok), "failed": sum(failed.values()), "failed_by_status": failed,
        "slo_attainment": round(met / len(outcomes), 4) if outcomes else None,
        "goodput_rps": round(met / duration_s, 3) if duration_s > 0 else None,
        "ttft_ms": percentiles([o.ttft_ms for o in ok if o.ttft_ms is not None]),
        "tpot_ms": percentiles([o.tpot_ms for o in ok if o.tpot_ms is not None]),
        "e2e_ms": percentiles([o.e2e_ms for o in ok if o.e2e_ms is not None]),
        "intended_rate_rps": _rate(intended), "achieved_rate_rps": _rate(sent),
        "send_lateness_ms": {**percentiles(lateness_ms), "max": round(max(lateness_ms), 2) if lateness_ms else None},
    }


def _rate(times: list[float]) -> float | None:
    if len(times) < 2 or max(times) == min(times):
        return None
    return round((len(times) - 1) / (max(times) - min(times)), 3)


def summarise(outcomes: list[Outcome], slos: dict[str, Slo], meta: dict) -> dict:
    ends = [o.end_s for o in outcomes if o.end_s is not None] + [o.sent_s for o in outcomes]
    duration_s = max(ends) if ends else 0.0
    scenarios = sorted({o.scenario for o in outcomes})
    return {
        **meta, "duration_s": round(duration_s, 3),
        "slos": {s: {"ttft_ms": slos[s].ttft_ms, "tpot_ms": slos[s].tpot_ms} for s in scenarios},
        "scenarios": {s: _group([o for o in outcomes if o.scenario == s], slos, duration_s) for s in scenarios},
        "all": _group(outcomes, slos, duration_s),
    }


def plot(outcomes: list[Outcome], slos: dict[str, Slo], out_dir: pathlib.Path, window_s: float = 5.0) -> list[pathlib.Path]:
    """latency_over_time.png (TTFT and TPOT per request by send time) and attainment.png (share
    of requests sent in each window that met their SLO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    scenarios = sorted({o.scenario for o in outcomes})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for s in scenarios:
        mine = [o for o in outcomes if o.scenario == s and o.status == "ok"]
        ax1.scatter([o.sent_s for o in mine], [o.ttft_ms for o in mine], s=6, label=s)
        ax2.scatter([o.sent_s for o in mine if o.tpot_ms], [o.tpot_ms for o in mine if o.tpot_ms], s=6, label=s)
    ax1.set_ylabel("TTFT (ms)")
    ax2.set_ylabel("TPOT (ms)")
    ax2.set_xlabel("send time (s)")
    ax1.legend()
    fig.tight_layout()
    latency = out_dir / "latency_over_time.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    end = max((o.sent_s for o in outcomes), default=0.0)
    for s in scenarios:
        xs, ys, t = [], [], 0.0
        while t <= end:
            window = [o for o in outcomes if o.scenario == s and t <= o.sent_s < t + window_s]
            if window:
                xs.append(t + window_s / 2)
                ys.append(sum(o.met(slos[s]) for o in window) / len(window))
            t += window_s
        ax.plot(xs, ys, marker="o", label=s)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"SLO attainment per {window_s:.0f} s")
    ax.set_xlabel("send time (s)")
    ax.legend()
    fig.tight_layout()
    attainment = out_dir / "attainment.png"
    fig.savefig(attainment, dpi=110)
    plt.close(fig)
    return [latency, attainment]
