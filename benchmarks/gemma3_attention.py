"""Gemma 3 prompt attention against the dense mask it replaced, side by side in one run.

    python benchmarks/gemma3_attention.py [--json] [--repeats N] [--tokens 1024,4096,8192]

`before` is Gemma3Model.attend_prompt as it was until 2026-12-05, kept here as the baseline: one
boolean mask over the whole prompt (causal, and the window on sliding layers) and one
scaled_dot_product_attention call, which holds a score matrix of heads x T x T. `now` is pdserve's:
full layers through `attend_after_past` (torch's causal kernel, no mask), sliding layers in blocks
of queries over their window's keys. Gemma 3 270M's attention shapes (4 query heads, 1 KV head,
head_dim 256, window 512), random inputs, one torch thread, a cold prompt (no cached prefix).
Reports p50 milliseconds of each, now / before, the largest mask each path builds (elements), and
the outputs' largest difference.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F
from transformers import Gemma3TextConfig

from pdserve.bench.side_by_side import alternate, model_bench_parser
from pdserve.workers.model import gemma3
from pdserve.workers.model.gemma3 import Gemma3Model, config_from_hf

_SLIDING, _FULL = 0, 1


def _model() -> Gemma3Model:
    hf = Gemma3TextConfig(vocab_size=256, hidden_size=640, intermediate_size=2048, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                          layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256,
                          max_position_embeddings=32768)
    return Gemma3Model(config_from_hf(hf.to_dict(), "gemma3-shapes"), weights=None)   # attention needs no weights


def _before(model: Gemma3Model, layer: int, q, k, v) -> torch.Tensor:
    query_pos = torch.arange(k.shape[0])[:, None]
    key_pos = torch.arange(k.shape[0])[None, :]
    mask = key_pos <= query_pos
    if window := model.config.layer_windows[layer]:
        mask &= query_pos - key_pos < window
    return F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], model._expand_kv(k.transpose(0, 1)[None]),
        model._expand_kv(v.transpose(0, 1)[None]), attn_mask=mask, scale=model.config.attn_scale,
    )[0].transpose(0, 1)


def _largest_mask(fn) -> int:
    sizes, sdpa = [0], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        sizes.append(0 if attn_mask is None else attn_mask.numel())
        return sdpa(*args, attn_mask=attn_mask, **kw)
    F.scaled_dot_product_attention = spy
    try:
        fn()
    finally:
        F.scaled_dot_product_attention = sdpa
    return max(sizes)


def measure(tokens: list[int], repeats: int) -> list[dict]:
    model, rows = _model(), []
    cfg = model.config
    for num_tokens in tokens:
        gen = torch.Generator().manual_seed(num_tokens)
        q = torch.randn(num_tokens, cfg.num_heads, cfg.head_dim, generator=gen)
        k, v = (torch.randn(num_tokens, cfg.num_kv_heads, cfg.head_dim, generator=gen) for _ in range(2))
        for layer, kind in ((_SLIDING, "sliding"), (_FULL, "full")):
            old = lambda: _before(model, layer, q, k, v)  # noqa: E731
            new = lambda: model.attend_prompt(layer, q, k, v, num_past=0)  # noqa: E731
            difference = (old() - new()).abs().max().item()
            times = alternate(old, new, repeats)
            row = {"case": f"{kind} layer, {num_tokens} tokens",
                   "before_p50_ms": round(statistics.median(times["before"]) * 1e3, 2),
                   "now_p50_ms": round(statistics.median(times["now"]) * 1e3, 2),
                   "before_largest_mask": _largest_mask(old), "now_largest_mask": _largest_mask(new),
                   "max_abs_output_difference": float(f"{difference:.2e}")}
            row["now_vs_before"] = round(row["now_p50_ms"] / row["before_p50_ms"], 3)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = model_bench_parser(__doc__.splitlines()[0], default_repeats=5)
    parser.add_argument("--tokens", default="1024,4096,8192", help="prompt lengths, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    with torch.inference_mode():
        rows = measure([int(t) for t in args.tokens.split(",")], args.repeats)
    report = {"torch_threads": args.torch_threads, "repeats": args.repeats,
              "query_block_tokens": gemma3.SLIDING_QUERY_BLOCK_TOKENS, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(f"{r['case']:<28} before {r['before_p50_ms']:9.1f} ms  now {r['now_p50_ms']:8.1f} ms  "
                  f"x{r['now_vs_before']:.3f}  largest mask {r['before_largest_mask']:>11,} -> "
                  f"{r['now_largest_mask']:>9,}  (outputs differ by {r['max_abs_output_difference']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
