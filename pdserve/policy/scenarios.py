"""Scenario classification: requests that behave alike share workers, SLOs and a P/D ratio.

Order of rules (first match wins): the `x-pdserve-scenario` header, the API key's tenant, a
prompt-prefix rule (hash of the first N prompt tokens, e.g. a shared system prompt), else the
default scenario.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

DEFAULT_SCENARIO = "default"


def prefix_hash(token_ids: list[int], num_tokens: int) -> str:
    """Stable 16-hex-digit digest of the first `num_tokens` token ids."""
    data = b",".join(str(t).encode() for t in token_ids[:num_tokens])
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 100.0
    header_values: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    prefix_tokens: int = 0
    prefix_hashes: tuple[str, ...] = ()
    min_prefill: int = 1
    max_prefill: int = 1_000_000
    min_decode: int = 1
    max_decode: int = 1_000_000

    def validate(self) -> None:
        if not self.name or len(self.name) > 128:
            raise ValueError("scenario name must be 1-128 characters")
        if self.ttft_slo_ms <= 0 or self.tpot_slo_ms <= 0:
            raise ValueError("ttft_slo_ms and tpot_slo_ms must be > 0")
        if self.prefix_hashes and self.prefix_tokens <= 0:
            raise ValueError("prefix_hashes need prefix_tokens > 0")
        if self.min_prefill < 0 or self.min_decode < 0 or self.min_prefill > self.max_prefill \
                or self.min_decode > self.max_decode:
            raise ValueError("role bounds must satisfy 0 <= min <= max")

    def to_rules(self) -> dict:
        return {"header_values": list(self.header_values), "tenants": list(self.tenants),
                "prefix_tokens": self.prefix_tokens, "prefix_hashes": list(self.prefix_hashes),
                "min_prefill": self.min_prefill, "max_prefill": self.max_prefill,
                "min_decode": self.min_decode, "max_decode": self.max_decode}

    @classmethod
    def from_rules(cls, name: str, ttft_slo_ms: float, tpot_slo_ms: float, rules: dict) -> "ScenarioSpec":
        return cls(name=name, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
                   header_values=tuple(rules.get("header_values", ())), tenants=tuple(rules.get("tenants", ())),
                   prefix_tokens=int(rules.get("prefix_tokens", 0)),
                   prefix_hashes=tuple(rules.get("prefix_hashes", ())),
                   min_prefill=int(rules.get("min_prefill", 1)), max_prefill=int(rules.get("max_prefill", 1_000_000)),
                   min_decode=int(rules.get("min_decode", 1)), max_decode=int(rules.get("max_decode", 1_000_000)))


@dataclass
class ScenarioClassifier:
    specs: dict[str, ScenarioSpec] = field(default_factory=dict)

    def classify(self, header: str, tenant: str, prompt_ids: list[int]) -> str:
        """A header naming a scenario is honoured unless the caller's tenant (known when API keys
        are on) is not among that scenario's tenants: then it is ignored, so no client picks
        another tenant's workers."""
        if header:
            named = [self.specs[header]] if header in self.specs else []
            for spec in named + [s for s in self.specs.values() if header in s.header_values]:
                if self._may_use(spec, tenant):
                    return spec.name
        if tenant:
            for spec in self.specs.values():
                if tenant in spec.tenants:
                    return spec.name
        for spec in self.specs.values():
            if spec.prefix_tokens and len(prompt_ids) >= spec.prefix_tokens \
                    and prefix_hash(prompt_ids, spec.prefix_tokens) in spec.prefix_hashes:
                return spec.name
        return DEFAULT_SCENARIO

    @staticmethod
    def _may_use(spec: ScenarioSpec, tenant: str) -> bool:
        return not tenant or not spec.tenants or tenant in spec.tenants

    def spec(self, name: str) -> ScenarioSpec:
        return self.specs.get(name) or ScenarioSpec(DEFAULT_SCENARIO)
