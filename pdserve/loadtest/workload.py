"""What a load test sends: trace rows -> requests with send times, scenarios, SLOs and prompts of
exactly the trace's input length for the served model's tokenizer. No I/O beyond reading the
trace; the Locust file and the tests both build their plans here."""
from __future__ import annotations

import random
from dataclasses import dataclass

from pdserve.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, load, load_file
from pdserve.workers.model.tokenizer import Tokenizer

# Named workloads: which built-in traces, and the scenario each one's requests belong to.
TRACE_SETS = {
    "azure": (("azure-conv", "conv"), ("azure-code", "code")),
    "azure-conv": (("azure-conv", "conv"),),
    "azure-code": (("azure-code", "code"),),
    "mooncake-conversation": (("mooncake-conversation", "default"),),
    "mooncake-synthetic": (("mooncake-synthetic", "default"),),
}
# Per-scenario SLOs (TTFT ms, TPOT ms) when the command line names none: the simulator's.
DEFAULT_SLOS_MS = {"conv": (1000.0, 50.0), "code": (2000.0, 50.0), "default": (5000.0, 100.0)}


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    @classmethod
    def parse(cls, spec: str) -> tuple[str, "Slo"]:
        """'conv=1000:50' -> ('conv', Slo(1000, 50))."""
        try:
            name, values = spec.split("=", 1)
            ttft, tpot = values.split(":", 1)
            return name.strip(), cls(float(ttft), float(tpot))
        except ValueError:
            raise ValueError(f"SLO {spec!r} is not SCENARIO=TTFT_MS:TPOT_MS (e.g. conv=1000:50)") from None


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    scenario: str
    send_s: float              # seconds after the replay starts (trace time / speedup)
    input_tokens: int          # after clipping: what the prompt encodes to
    output_tokens: int
    block_hashes: tuple[int, ...] = ()


def plan(trace: str | None, trace_file: str | None, minutes: float, speedup: float,
         max_input_tokens: int | None = None, max_output_tokens: int | None = None) -> list[PlannedRequest]:
    """The first `minutes` of trace time, merged across the set's traces, in send order."""
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    sources: tuple[tuple[list[TraceRequest], str], ...]
    if trace_file:
        sources = ((load_file(trace_file), "default"),)
    else:
        if (trace or "azure-conv") not in TRACE_SETS:
            raise ValueError(f"unknown trace {trace!r}; one of {', '.join(TRACE_SETS)}")
        sources = tuple((load(name), scenario) for name, scenario in TRACE_SETS[trace or "azure-conv"])
    rows = []
    for reqs, scenario in sources:
        for r in reqs:
            if r.arrival_s >= minutes * 60:
                break
            n_in = min(r.input_tokens, max_input_tokens) if max_input_tokens else r.input_tokens
            n_out = min(r.output_tokens, max_output_tokens) if max_output_tokens else r.output_tokens
            rows.append((r.arrival_s / speedup, scenario, max(1, n_in), max(1, n_out), r.block_hashes))
    rows.sort(key=lambda row: (row[0], row[1]))
    return [PlannedRequest(i, s, t, n_in, n_out, h) for i, (t, s, n_in, n_out, h) in enumerate(rows)]


class PromptSynthesizer:
    """Text that encodes to exactly N tokens (special tokens included). Built from "units":
    strings that are one token each and stay one token each when concatenated (a word with its
    leading space for BPE vocabularies, a letter for byte-level ones). A prompt with Mooncake
    block hashes is made block by block, each block seeded by its hash, so requests that share a
    prefix in the trace share it in text too."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0):
        self.tok = tokenizer
        self.seed = seed
        self.overhead = len(tokenizer.encode(""))
        self.units = _single_token_units(tokenizer)

    def prompt(self, num_tokens: int, block_hashes: tuple[int, ...] = (), request_seed: int = 0) -> str:
        body = max(0, num_tokens - self.overhead)
        parts: list[str] = []
        used = 0
        for h in block_hashes:
            n = min(MOONCAKE_BLOCK_TOKENS, body - used)
            if n <= 0:
                break
            parts.append(self._words(n, random.Random(f"{self.seed}/block/{h}")))
            used += n
        parts.append(self._words(body - used, random.Random(f"{self.seed}/request/{request_seed}")))
        text = "".join(parts)
        return self._exact(text, num_tokens)

    def _words(self, n: int, rng: random.Random) -> str:
        return "".join(rng.choice(self.units) for _ in range(n))

    def _exact(self, text: str, num_tokens: int) -> str:
        """Units nearly always add up exactly; where a tokenizer merges across them, trim or pad."""
        for _ in range(64):
            n = len(self.tok.encode(text))
            if n == num_tokens:
                return text
            text = text[:-1] if n > num_tokens else text + self.units[0]
        raise ValueError(f"cannot make a prompt of exactly {num_tokens} tokens for this tokenizer")


def _single_token_units(tok: Tokenizer, max_units: int = 2000) -> list[str]:
    candidates = [" " + w for w in _WORDS] + list("abcdefghijklmnopqrstuvwxyz")
    units = []
    for u in candidates:
        ids = tok.encode(u, add_bos=False)
        if len(ids) == 1 and len(tok.encode(u * 3, add_bos=False)) == 3:
            units.append(u)
        if len(units) >= max_units:
            break
    if not units:
        raise ValueError("no single-token words or letters in this tokenizer's vocabulary")
    return units


_WORDS = ("the of and to in is was for on that with as by at from his it an were are which this be or "
          "has had first one their its new after but who not they have her she two been other when "
          "there all during into school time may years more most only over city some world would where "
          "later up such used many can state about national out known university united then made also "
          "team system model data request token cache server worker prefill decode batch memory queue "
          "river music film game house paper light water stone green market table window garden paint").split()
