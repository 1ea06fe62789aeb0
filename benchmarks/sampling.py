"""Token sampling against the sampler it replaced, side by side in one run.

The previous sampler drew with `torch.multinomial` (one random number per vocabulary entry) and
sorted the whole vocabulary for top_p; the current one inverts the cumulative distribution at one
uniform number and finds the nucleus by a partial sort. Cases, on the model's own next-token
distributions over a fixed English text (each position of it):
- one token sampled, at temperature 1 with and without top_p;
- one decode step of the engine (`Engine.step`, which samples every sequence of the batch once)
  with 8 sequences at temperature 1, top_p 0.9, the baseline swapped in for the engine's sampler.
Timings alternate between the two; `--json` prints one document.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
from unittest import mock

import torch

from pdserve.bench.side_by_side import alternate, model_bench_parser
from pdserve.workers import engine as engine_module
from pdserve.workers.engine import Engine
from pdserve.workers.model.execution import PrefillExecution
from pdserve.workers.model.loader import load_model
from pdserve.workers.model.sampling import _SEED_MASK, _STEP_MIX, SamplingConfig, sample_token, suppress_eos

TEXT = ("The history of the Roman Empire spans many centuries. It began when Augustus became the first "
        "emperor, and in the west it ended when the last emperor was deposed in the year 476. Its roads, "
        "laws and language shaped Europe long after its fall.")


def baseline_sample_token(logits: torch.Tensor, params: SamplingConfig, step_index: int,
                          eos_token_ids: tuple[int, ...] = ()) -> int:
    """The sampler before 2026-12-05, kept as the benchmark's baseline."""
    logits = suppress_eos(logits, params, step_index, eos_token_ids)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator()
    if params.seed is not None:
        gen.manual_seed((params.seed * _STEP_MIX + step_index) & _SEED_MASK)
    else:
        gen.seed()
    return int(torch.multinomial(probs, 1, generator=gen))


def text_logits(loaded, ids: torch.Tensor) -> list[torch.Tensor]:
    """The model's next-token logits after about 24 prefixes of the text."""
    out = []
    for n in range(2, len(ids) + 1, max(1, len(ids) // 24)):
        execution = PrefillExecution(loaded.model, ids[:n].tolist())
        while not execution.done:
            execution.step()
        out.append(execution.logits)
    return out


def _row(case: str, times: dict[str, list[float]], unit_scale: float, unit: str) -> dict:
    before, now = (statistics.median(times[k]) * unit_scale for k in ("before", "now"))
    return {"case": case, f"before_p50_{unit}": round(before, 2), f"now_p50_{unit}": round(now, 2),
            "now_vs_before": round(now / before, 3)}


def sampling_rows(all_logits: list[torch.Tensor], repeats: int) -> list[dict]:
    rows = []
    for top_p in (1.0, 0.9):
        params = SamplingConfig(temperature=1.0, top_p=top_p, seed=3)
        state = {"i": 0}

        def each(fn):
            def run():
                for step, logits in enumerate(all_logits):
                    fn(logits, params, step + state["i"])
                state["i"] += 1
            return run
        times = alternate(each(baseline_sample_token), each(sample_token), repeats)
        per_token = {k: [t / len(all_logits) for t in v] for k, v in times.items()}
        rows.append(_row(f"one token, temperature 1, top_p {top_p}", per_token, 1e6, "us"))
    return rows


def decode_step_row(loaded, repeats: int, batch: int = 8, prompt_tokens: int = 64) -> dict:
    """Engine.step over `batch` sequences sampled at temperature 1, top_p 0.9; the baseline swaps
    in the old sampler for the same engine, step by step."""
    cfg = loaded.model.config
    num_blocks = batch * (prompt_tokens + 2 * repeats + 40) // 16 + batch
    engine = Engine(loaded, num_kv_blocks=num_blocks, block_size_tokens=16, max_batch_size=batch)
    params = SamplingConfig(max_tokens=4 * repeats + 20, temperature=1.0, top_p=0.9, seed=1, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()
        engine.admit(f"s{i}", prompt_tokens)
        layers = [torch.randn(2, prompt_tokens, cfg.num_kv_heads, cfg.head_dim, generator=gen)
                  for _ in range(cfg.num_layers)]
        engine.start(f"s{i}", prompt, layers, params, first_token_id=prompt[-1])

    def old():
        with mock.patch.object(engine_module, "sample_token", baseline_sample_token):
            engine.step()
    times = alternate(old, engine.step, repeats)
    return _row(f"decode step, {batch} sequences, temperature 1, top_p 0.9", times, 1e3, "ms")


def main(argv: list[str] | None = None) -> int:
    parser = model_bench_parser(__doc__.splitlines()[0], default_repeats=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    loaded = load_model(args.model, pathlib.Path(args.cache_dir))
    with torch.inference_mode():
        all_logits = text_logits(loaded, torch.tensor(loaded.tokenizer.encode(TEXT)))
        rows = sampling_rows(all_logits, args.repeats) + [decode_step_row(loaded, args.repeats)]
    report = {"model": args.model, "vocab_size": loaded.model.config.vocab_size, "positions": len(all_logits),
              "torch_threads": args.torch_threads, "repeats": args.repeats, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            unit = "us" if "before_p50_us" in r else "ms"
            print(f"{r['case']:<58} before {r[f'before_p50_{unit}']:9.2f} {unit}  now {r[f'now_p50_{unit}']:9.2f} "
                  f"{unit}  x{r['now_vs_before']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
