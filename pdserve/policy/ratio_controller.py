"""P/D ratio controller (P/D-Serve): per scenario, split its workers between prefill and decode
so both roles run at the same utilisation under the scenario's SLOs.

Demand model, from a sliding window of observed requests and the workers' profiled speed:
- prefill load (in workers) = arrival rate x mean input tokens / prefill tokens per second;
- decode load (in workers) = arrival rate x mean output tokens / decode tokens per second, where a
  decode worker's rate is B/step(B) at the largest batch B whose step time meets the TPOT SLO.
Target prefill count = round(N x prefill load / (prefill + decode load)), clamped to the
scenario's bounds. Stability: no change while utilisations differ by less than `hysteresis`
(relative), none within `cooldown_s` of the previous change, at most `max_step` workers per
change, and a pinned ratio overrides everything. Pure: the caller passes `now_s`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.policy.scenarios import ScenarioSpec


@dataclass(frozen=True)
class WorkerPerf:
    prefill_tokens_per_s: float
    decode_step_base_s: float        # step time = base + per_seq * batch
    decode_step_per_seq_s: float
    max_batch: int = 256

    def decode_tokens_per_s(self, tpot_slo_s: float) -> float:
        room = tpot_slo_s - self.decode_step_base_s
        if room <= 0:
            return 1.0 / max(self.decode_step_base_s, 1e-9)   # SLO unmeetable: best effort, batch 1
        batch = max(1, min(self.max_batch, int(room / max(self.decode_step_per_seq_s, 1e-12))))
        return batch / (self.decode_step_base_s + self.decode_step_per_seq_s * batch)


@dataclass(frozen=True)
class ControllerConfig:
    window_s: float = 60.0
    cooldown_s: float = 30.0
    hysteresis: float = 0.2
    max_step: int = 1


@dataclass(frozen=True)
class RatioDecision:
    scenario: str
    at_s: float
    old: tuple[int, int]
    new: tuple[int, int]
    reason: str
    inputs: dict


@dataclass
class _ScenarioState:
    arrivals: deque = field(default_factory=deque)    # (t_s, input_tokens, output_tokens)
    last_change_s: float = float("-inf")
    pinned: tuple[int, int] | None = None


class RatioController:
    def __init__(self, config: ControllerConfig = ControllerConfig()):
        self.config = config
        self._states: dict[str, _ScenarioState] = {}

    def _state(self, scenario: str) -> _ScenarioState:
        return self._states.setdefault(scenario, _ScenarioState())

    def observe(self, scenario: str, now_s: float, input_tokens: int, output_tokens: int) -> None:
        st = self._state(scenario)
        st.arrivals.append((now_s, input_tokens, output_tokens))
        self._trim(st, now_s)

    def _trim(self, st: _ScenarioState, now_s: float) -> None:
        while st.arrivals and st.arrivals[0][0] < now_s - self.config.window_s:
            st.arrivals.popleft()

    def pin(self, scenario: str, num_prefill: int, num_decode: int) -> None:
        if num_prefill < 0 or num_decode < 0:
            raise ValueError("worker counts must be >= 0")
        self._state(scenario).pinned = (num_prefill, num_decode)

    def unpin(self, scenario: str) -> None:
        self._state(scenario).pinned = None

    def pinned(self, scenario: str) -> tuple[int, int] | None:
        return self._state(scenario).pinned

    def demand(self, scenario: str, spec: ScenarioSpec, perf: WorkerPerf, now_s: float) -> dict:
        st = self._state(scenario)
        self._trim(st, now_s)
        n = len(st.arrivals)
        if n == 0:
            return {"arrival_rps": 0.0, "mean_input_tokens": 0.0, "mean_output_tokens": 0.0,
                    "prefill_load": 0.0, "decode_load": 0.0}
        rate = n / self.config.window_s
        mean_in = sum(a[1] for a in st.arrivals) / n
        mean_out = sum(a[2] for a in st.arrivals) / n
        return {"arrival_rps": rate, "mean_input_tokens": mean_in, "mean_output_tokens": mean_out,
                "prefill_load": rate * mean_in / perf.prefill_tokens_per_s,
                "decode_load": rate * mean_out / perf.decode_tokens_per_s(spec.tpot_slo_ms / 1e3)}

    def decide(self, scenario: str, spec: ScenarioSpec, current: tuple[int, int], perf: WorkerPerf,
               now_s: float) -> RatioDecision | None:
        st = self._state(scenario)
        total = current[0] + current[1]
        if st.pinned is not None:
            return None if st.pinned == current else self._change(scenario, st, now_s, current, st.pinned,
                                                                  "pinned by an operator", {})
        d = self.demand(scenario, spec, perf, now_s)
        if total < 2 or d["prefill_load"] + d["decode_load"] == 0:
            return None
        target_p = round(total * d["prefill_load"] / (d["prefill_load"] + d["decode_load"]))
        target_p = max(spec.min_prefill, min(target_p, spec.max_prefill, total - spec.min_decode))
        target_p = max(target_p, total - spec.max_decode)
        if target_p == current[0] or now_s - st.last_change_s < self.config.cooldown_s:
            return None
        util_p = d["prefill_load"] / max(current[0], 1e-9)
        util_d = d["decode_load"] / max(current[1], 1e-9)
        imbalance = abs(util_p - util_d) / max(util_p, util_d)
        if imbalance < self.config.hysteresis:
            return None
        step = max(-self.config.max_step, min(self.config.max_step, target_p - current[0]))
        new = (current[0] + step, total - current[0] - step)
        reason = (f"prefill utilisation {util_p:.2f} vs decode {util_d:.2f} "
                  f"(imbalance {imbalance:.0%}); target {target_p}:{total - target_p}")
        return self._change(scenario, st, now_s, current, new, reason, {**d, "imbalance": imbalance})

    def _change(self, scenario, st, now_s, old, new, reason, inputs) -> RatioDecision:
        st.last_change_s = now_s
        return RatioDecision(scenario, now_s, old, new, reason, {k: round(v, 6) for k, v in inputs.items()})
