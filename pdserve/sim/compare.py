"""`pdserve sim`: pdserve's policies against the baselines users would otherwise pick, on one
workload, in one run. Same seed and arguments give the same report, byte for byte.

pdserve: disaggregated workers, each scenario with its own workers, the RatioController moving each scenario's
split, placement by the router's Dispatcher with on-demand forwarding, FlowPrefill ordering on
prefill workers. A request every worker refuses counts as not served (the client got 429). Baselines: the same number of aggregated workers
behind round-robin, least-loaded, power-of-two or prefix-aware routing, and disaggregated
workers at the best static split found by sweeping every split (DistServe-style), with fcfs
prefill (`static-best`) and with pdserve's FlowPrefill and forwarding (`static-best-flowprefill`,
which leaves the ratio control as the only difference). Aggregated
workers run whole prompts between decode steps (`aggregated-*`) or chunked prefill mixed into
decode steps under a token budget (`aggregated-chunked-*`, vLLM's default scheduler; the best
of five budgets per router, named in the row).
"""
from __future__ import annotations

import copy
import pathlib
import sys

from pdserve.policy.ratio_controller import ControllerConfig, RatioController
from pdserve.policy.baseline_routers import BASELINE_ROUTERS, PowerOfTwo
from pdserve.policy.prefix_cache import chain_hashes, infinite_cache_hit_rate
from pdserve.policy.scenarios import ScenarioClassifier, ScenarioSpec
from pdserve.sim.aggregated import AggregatedSimulation
from pdserve.sim.fleet import SimRequest, Simulation
from pdserve.sim.hardware import PRESETS
from pdserve.sim.report import summarize
from pdserve.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, load_azure, load_file, load_mooncake

SCENARIOS = {
    "conv": ScenarioSpec("conv", ttft_slo_ms=1000, tpot_slo_ms=50, header_values=("conv",)),
    "code": ScenarioSpec("code", ttft_slo_ms=2000, tpot_slo_ms=50, header_values=("code",)),
}


def azure_merged(minutes: float, speedup: float) -> list[SimRequest]:
    out = []
    for kind in ("conv", "code"):
        for i, t in enumerate(load_azure(kind)):
            if t.arrival_s > minutes * 60:
                break
            out.append(SimRequest(f"{kind}-{i}", kind, t.arrival_s / speedup, t.input_tokens, max(1, t.output_tokens)))
    return sorted(out, key=lambda r: (r.arrival_s, r.req_id))


# Per-step token budgets tried for the chunked-prefill baselines; each router keeps its best (a
# budget must fit the TPOT SLO: 50 ms at 12k prefill tokens/s is ~400 tokens). vLLM's
# defaults span them (512 in its first chunked-prefill release, 2,048 or 8,192 for its OpenAI
# server depending on the GPU); a small budget protects TPOT, a large one prefill throughput.
CHUNK_TOKENS = (256, 512, 1024, 2048, 8192)
# Conditional disaggregation in the simulator: at most one 512-token trace block left to compute
# on the decode worker (the index sees whole blocks only), a decode stall well under the TPOT SLO.
LOCAL_PREFILL_MAX_TOKENS = 512
MOONCAKE_SCENARIOS = {"default": ScenarioSpec("default", ttft_slo_ms=5000, tpot_slo_ms=100)}


def mooncake(minutes: float, speedup: float) -> tuple[list[SimRequest], dict[str, tuple[int, ...]]]:
    """Requests of the Mooncake conversation trace and their 512-token block hashes."""
    return one_scenario(load_mooncake("conversation"), minutes, speedup, "mc")


def one_scenario(trace: list[TraceRequest], minutes: float, speedup: float, prefix: str
                 ) -> tuple[list[SimRequest], dict[str, tuple[int, ...]]]:
    """A trace replayed as one scenario, with its block hashes where it has them."""
    out, hashes = [], {}
    for i, t in enumerate(trace):
        if t.arrival_s > minutes * 60:
            break
        r = SimRequest(f"{prefix}-{i}", "", t.arrival_s / speedup, t.input_tokens, max(1, t.output_tokens))
        out.append(r)
        hashes[r.req_id] = t.block_hashes
    return out, hashes


def _aggregated(hw, n_total: int, cls, seed: int, base: list[SimRequest], classifier, block_hashes,
                chunk_tokens: int | None) -> dict:
    router = cls(seed) if cls is PowerOfTwo else cls()
    reqs = _with_slos(copy.deepcopy(base), classifier)
    return summarize(AggregatedSimulation(hw, n_total, router, block_hashes, chunk_tokens).run(reqs))


def _with_slos(reqs: list[SimRequest], classifier: ScenarioClassifier) -> list[SimRequest]:
    for r in reqs:
        r.scenario = classifier.classify(r.scenario_header, "", [])
        spec = classifier.spec(r.scenario)
        r.ttft_slo_s, r.tpot_slo_s = spec.ttft_slo_ms / 1e3, spec.tpot_slo_ms / 1e3
    return reqs


def run(minutes: float = 20, speedup: float = 4, workers_per_scenario: int = 8, hardware: str = "llama3-8b-h100",
        seed: int = 0, progress=None, trace: str = "azure", trace_file: pathlib.Path | None = None) -> dict:
    """trace 'azure': merged conv+code as two scenarios; 'mooncake': the conversation trace as one
    scenario, with prefix sharing (its block hashes) for the prefix-aware baseline; `trace_file`
    (any format pdserve.traces reads) replaces either, as one scenario."""
    hw = PRESETS[hardware]
    if trace_file is not None or trace == "mooncake":
        base, block_hashes = (one_scenario(load_file(trace_file), minutes, speedup, "f") if trace_file
                              else mooncake(minutes, speedup))
        scenarios = MOONCAKE_SCENARIOS
        workers_per_scenario *= 2            # one scenario holds the whole fleet
    else:
        base, block_hashes, scenarios = azure_merged(minutes, speedup), {}, SCENARIOS
    classifier = ScenarioClassifier(dict(scenarios))
    g, n_total = workers_per_scenario, workers_per_scenario * len(scenarios)
    say = progress or (lambda _msg: None)
    results: dict[str, dict] = {}

    say("pdserve (disaggregated, dynamic per-scenario ratio, FlowPrefill)")
    controller = RatioController(ControllerConfig(window_s=20.0, cooldown_s=10.0, hysteresis=0.2, max_step=1))
    sim = Simulation(hw, {s: (g // 2, g - g // 2) for s in scenarios}, classifier, controller, control_interval_s=2.0,
                     prefill_policy="flowprefill", forwarding=True)
    results["pdserve"] = {**summarize(sim.run(copy.deepcopy(base))), "utilisation": sim.utilisation()}
    results["pdserve"]["ratio_over_time"] = [{"t_s": round(t, 1), "scenario": s, "prefill": p, "decode": d}
                                             for t, s, p, d in sim.ratio_log]
    if any(block_hashes.values()):
        say("pdserve with prefix caches and cache-aware routing")
        controller = RatioController(ControllerConfig(window_s=20.0, cooldown_s=10.0, hysteresis=0.2, max_step=1))
        cached = Simulation(hw, {s: (g // 2, g - g // 2) for s in scenarios}, classifier, controller,
                            control_interval_s=2.0, prefill_policy="flowprefill", forwarding=True,
                            block_hashes=block_hashes, prefix_caching=True, cache_aware=True)
        results["pdserve-prefix-cache"] = {**summarize(cached.run(copy.deepcopy(base))),
                                           "utilisation": cached.utilisation(),
                                           "prefix_hit_rate": cached.prefix_hit_rate(),
                                           "kv_transfer": cached.kv_transfer(),
                                           "prefix_hit_rate_upper_bound": round(infinite_cache_hit_rate(
                                               ((chain_hashes(block_hashes[r.req_id]), r.input_tokens) for r in base),
                                               MOONCAKE_BLOCK_TOKENS), 4)}
        say("the same, with conditional disaggregation")
        controller = RatioController(ControllerConfig(window_s=20.0, cooldown_s=10.0, hysteresis=0.2, max_step=1))
        local = Simulation(hw, {s: (g // 2, g - g // 2) for s in scenarios}, classifier, controller,
                           control_interval_s=2.0, prefill_policy="flowprefill", forwarding=True,
                           block_hashes=block_hashes, prefix_caching=True, cache_aware=True,
                           local_prefill_max_tokens=LOCAL_PREFILL_MAX_TOKENS)
        results["pdserve-prefix-cache-local-prefill"] = {
            **summarize(local.run(copy.deepcopy(base))), "utilisation": local.utilisation(),
            "prefix_hit_rate": local.prefix_hit_rate(), "kv_transfer": local.kv_transfer(),
            "local_prefills": local.num_local_prefills, "local_prefill_max_tokens": LOCAL_PREFILL_MAX_TOKENS}
    results["static-best"] = _best_static(hw, scenarios, classifier, g, base, say)
    # The same sweep with pdserve's prefill side (FlowPrefill, on-demand forwarding): against it,
    # the margin is the ratio control's alone.
    results["static-best-flowprefill"] = _best_static(hw, scenarios, classifier, g, base, say,
                                                      prefill_policy="flowprefill", forwarding=True)
    for name, cls in BASELINE_ROUTERS.items():
        say(f"aggregated x{n_total}, {name}")
        results[f"aggregated-{name}"] = _aggregated(hw, n_total, cls, seed, base, classifier, block_hashes, None)
    for name, cls in BASELINE_ROUTERS.items():
        say(f"aggregated x{n_total} with chunked prefill, {name}")
        rows = [{**_aggregated(hw, n_total, cls, seed, base, classifier, block_hashes, n), "chunk_tokens": n}
                for n in CHUNK_TOKENS]
        results[f"aggregated-chunked-{name}"] = max(rows, key=lambda row: row["goodput_rps"])
    ours_name = "pdserve-prefix-cache" if "pdserve-prefix-cache" in results else "pdserve"
    ours = results[ours_name]["goodput_rps"]
    baselines = {k: v for k, v in results.items() if not k.startswith("pdserve")}
    strongest = max(baselines, key=lambda k: (baselines[k]["goodput_rps"], k))
    workload = (str(trace_file) if trace_file else
                "mooncake FAST'25 conversation" if trace == "mooncake" else "azure2023 conv+code merged")
    return {"workload": workload, "minutes": minutes, "speedup": speedup, "hardware": hardware,
            "num_workers": n_total, "num_requests": len(base), "seed": seed, "results": results,
            "pdserve_configuration": ours_name, "strongest_baseline": strongest,
            "goodput_ratio_pdserve_vs": {k: round(ours / max(v["goodput_rps"], 1e-9), 3)
                                         for k, v in results.items() if k != ours_name}}


def _best_static(hw, scenarios, classifier, g: int, base, say, **prefill) -> dict:
    """Every fixed split of g workers per scenario, the best by goodput (DistServe-style)."""
    best = None
    for p in range(1, g):
        say(f"static P/D {p}:{g - p}{' with FlowPrefill' if prefill else ''}")
        static = Simulation(hw, {s: (p, g - p) for s in scenarios}, classifier, None, **prefill)
        row = {**summarize(static.run(copy.deepcopy(base))), "utilisation": static.utilisation()}
        if best is None or row["goodput_rps"] > best[1]["goodput_rps"]:
            best = (f"{p}:{g - p}", row)
    return {**best[1], "ratio": best[0]}


def format_table(report: dict) -> str:
    head = f"{'configuration':<44}{'goodput/s':>10}{'attain':>8}{'TTFT p99':>10}{'TPOT p99':>10}{'pdserve x':>10}"
    lines = [head, "-" * len(head)]
    for name, row in report["results"].items():
        ratio = report["goodput_ratio_pdserve_vs"].get(name, 1.0)
        if name == report.get("strongest_baseline"):
            name += " (strongest)"
        lines.append(f"{name:<44}{row['goodput_rps']:>10.2f}{row['attainment']:>8.3f}"
                     f"{row['ttft_p99_ms'] or 0:>10.0f}{row['tpot_p99_ms'] or 0:>10.1f}{ratio:>10.2f}")
    return "\n".join(lines)


_NUM_STAGES = 23   # pdserve, 2 x 7 static splits (at 8 workers per scenario), 4 routers x 2 aggregated schedulers


class _ProgressBar:
    def __init__(self):
        self.done = 0

    def __call__(self, msg: str) -> None:
        self.done += 1
        filled = min(self.done, _NUM_STAGES) * 30 // _NUM_STAGES
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {msg[:60]:<60}", end="", file=sys.stderr, flush=True)
        if self.done >= _NUM_STAGES:
            print(file=sys.stderr)


def stderr_progress(msg: str, _bar=_ProgressBar()) -> None:
    _bar(msg)


def sweep(speedups: list[float], **kwargs) -> dict:
    """Goodput of every configuration at several replay rates (for the goodput-vs-rate plot)."""
    rows = []
    for sp in speedups:
        report = run(speedup=sp, **kwargs)
        rows.append({"speedup": sp, "arrival_rps": round(report["num_requests"] / (kwargs.get("minutes", 20) * 60 / sp), 2),
                     **{name: r["goodput_rps"] for name, r in report["results"].items()}})
    return {"sweep": rows}


def plot(report: dict, sweep_rows: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """goodput_vs_rate.png and ratio_over_time.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in report["results"]:
        ax.plot([r["arrival_rps"] for r in sweep_rows], [r[name] for r in sweep_rows], marker="o", label=name)
    ax.set_xlabel("arrival rate (req/s)")
    ax.set_ylabel("goodput (req/s meeting TTFT and TPOT SLOs)")
    ax.set_title(f"{report['workload']}, {report['num_workers']} x {report['hardware']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths = [out_dir / "goodput_vs_rate.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    log = report["results"]["pdserve"]["ratio_over_time"]
    for scenario in sorted({r["scenario"] for r in log}):
        pts = [(r["t_s"], r["prefill"]) for r in log if r["scenario"] == scenario]
        end = max(r["t_s"] for r in report["results"]["pdserve"]["ratio_over_time"]) + 1
        xs = [t for t, _ in pts] + [end]
        ys = [p for _, p in pts] + [pts[-1][1]]
        ax.step(xs, ys, where="post", label=f"{scenario}: prefill workers")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("prefill workers (of each scenario)")
    ax.set_title("pdserve's P/D ratio over time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(out_dir / "ratio_over_time.png")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
