"""The model's operators against the ones they replaced, side by side in one run.

    python benchmarks/model_ops.py [--json] [--repeats N] [--model tiny|smollm2-135m]

`before` is the attention as it was until 2026-12-05 (edbd917), kept here as the baseline: every KV head
copied once per query head (repeat_interleave) before attention, in prefill and in decode, and a
prompt's KV concatenated from its chunks (or its cached prefix) at every layer, and once more to
report the layer. `now` is pdserve's LlamaModel and UnitExecution: a prompt's KV is one buffer
per layer written in place, and the query heads that share a KV head attend as one group.
Both run the same weights on the same inputs, alternating, one torch thread (a worker's share on
a small host); the report gives p50 milliseconds of each and now / before.

Cases: a cold 5-token prefill (nothing to gain: the control); 12 new tokens after a cached prefix
of 288 or 1,888 tokens (the prefill worker's path for a prefix-cache hit); the prefix cache's read
of those prefixes into the prompt's buffers (before: gathered by token slot across all layers,
stacked per layer, then copied into the prompt's buffers; now: copied block by block straight
into them, `PagedKVCache.gather_blocks`); and one decode step
of the engine (`decode_step`: gather from the paged pool, projections, attention over the
context, MLP, logits) for a batch of sequences.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F

from pdserve.bench.side_by_side import alternate, model_bench_parser
from pdserve.policy.prefill_scheduler import Piece, PrefillJob, WorkUnit
from pdserve.workers.kv_cache import BlockAllocator, PagedKVCache
from pdserve.workers.model.attention import attend_after_past
from pdserve.workers.model.execution import decode_step
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.loader import load_model
from pdserve.workers.model.unit_execution import CachedPrefix, JobState, LayerReady, UnitExecution


class Before(LlamaModel):
    """The attention before 2026-12-05 (the rest of the model is shared)."""

    def attend_prompt(self, layer, q, k, v, num_past):
        return attend_after_past(q.transpose(0, 1)[None], self._expand_kv(k.transpose(0, 1)[None]),
                                 self._expand_kv(v.transpose(0, 1)[None]), num_past=num_past)[0].transpose(0, 1)

    def decode_attention(self, layer, hidden, q, k_ctx, v_ctx, ctx_mask):
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), self._expand_kv(k_ctx.permute(0, 2, 1, 3)), self._expand_kv(v_ctx.permute(0, 2, 1, 3)),
            attn_mask=ctx_mask[:, None, None, :]).squeeze(2)
        return self.attention_output(layer, hidden, out)


class _ChunkState(JobState):
    """The old JobState: per layer, the K and V chunks computed so far, concatenated on use."""

    def init_layers(self, num_layers: int) -> None:
        if not hasattr(self, "k_chunks"):
            self.k_chunks = [[] for _ in range(num_layers)]
            self.v_chunks = [[] for _ in range(num_layers)]

    def seed(self, prefix_kv: list[torch.Tensor]) -> None:
        self.k_chunks = [[kv[0]] for kv in prefix_kv]
        self.v_chunks = [[kv[1]] for kv in prefix_kv]

    def past(self, layer: int):
        if not self.k_chunks[layer]:
            return None, None
        return torch.cat(self.k_chunks[layer]), torch.cat(self.v_chunks[layer])


class _BeforeUnit(UnitExecution):
    """The old UnitExecution's attention step: concatenate the chunks, attend, append, and
    concatenate and stack them again to report a finished layer."""

    def _attend(self, i, st, piece, layer):
        past_k, past_v = st.past(layer)
        self._hidden[i], k, v = self.model.prefill_attention(layer, self._hidden[i], self._positions[i], past_k, past_v)
        st.k_chunks[layer].append(k)
        st.v_chunks[layer].append(v)
        if piece.start_token + piece.num_tokens != len(st.token_ids):
            return None
        full_k, full_v = st.past(layer)
        return LayerReady(st.req_id, layer, torch.stack([full_k, full_v]).contiguous())


def _prefill(model: LlamaModel, ids: list[int], prefix: list[torch.Tensor] | None, state_type=JobState,
             execution_type=UnitExecution) -> torch.Tensor:
    """One prompt through a work unit, as the prefill worker's runner steps it."""
    cached = 0 if prefix is None else prefix[0].shape[1]
    state = state_type("bench", ids)
    if prefix is not None:
        # The current state adopts buffers for the whole prompt (the prefix cache gathers into
        # them); making them here copies the prefix once, as the previous seed() did.
        state.seed(CachedPrefix.of(prefix, len(ids)) if state_type is JobState else prefix)
    unit = WorkUnit([Piece(PrefillJob("bench", len(ids), 0.0, 1.0, cached_tokens=cached), cached, len(ids) - cached)],
                    model.config.num_layers)
    execution = execution_type(model, unit, {"bench": state})
    while not unit.finished:
        execution.run_operator()
        unit.next_op += 1
    return state.logits


def _before_prefill(model: Before, ids: list[int], prefix: list[torch.Tensor] | None) -> torch.Tensor:
    return _prefill(model, ids, prefix, _ChunkState, _BeforeUnit)


def _now_prefill(model: LlamaModel, ids: list[int], prefix: list[torch.Tensor] | None) -> torch.Tensor:
    return _prefill(model, ids, prefix)


def _prefix_read(model: LlamaModel, cached: int, now: bool):
    """The prefill worker's read of a cached prefix of `cached` tokens (whole blocks of 16) from
    its paged pool into the buffers of a prompt 12 tokens longer; returns the prefix's KV."""
    cfg, bs = model.config, 16
    allocator = BlockAllocator(cached // bs + 2, bs)
    cache = PagedKVCache(cfg, allocator)
    gen = torch.Generator().manual_seed(cached)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    allocator.allocate("cached", cached)
    blocks, ids = allocator.table("cached")[:cached // bs], list(range(cached + 12))

    def read() -> torch.Tensor:
        state = JobState("bench", ids)
        if now:
            state.seed(CachedPrefix(cache.gather_blocks(blocks, len(ids)), cached))
        else:
            slots = cache._block_slots(blocks)
            k, v = cache.k[:, slots], cache.v[:, slots]
            state.seed(CachedPrefix.of([torch.stack([k[layer], v[layer]]) for layer in range(cfg.num_layers)],
                                       len(ids)))
        return torch.stack([kv[:, :cached] for kv in state.kv])
    return read


def _decode(model: LlamaModel, batch: int, context: int):
    """One decode_step of the engine over a paged pool of random KV; every other sequence is half
    as long, so the batch's context is padded and masked."""
    cfg = model.config
    lengths = [context if i % 2 == 0 else context // 2 for i in range(batch)]
    allocator = BlockAllocator(sum(n // 16 + 2 for n in lengths), 16)
    cache = PagedKVCache(cfg, allocator)
    gen = torch.Generator().manual_seed(batch * 31 + context)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    req_ids = [f"r{i}" for i in range(batch)]
    for req_id, n in zip(req_ids, lengths):
        allocator.allocate(req_id, n)
        allocator.append_token(req_id)      # the new token's slot, rewritten at every step
    tokens = [(7 * i) % cfg.vocab_size for i in range(batch)]
    return lambda: decode_step(model, cache, req_ids, tokens)


def _cases(model: LlamaModel, before: Before) -> list[tuple[str, callable, callable]]:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    cases = [("prefill 5 tokens", lambda m, f: lambda: f(m, list(range(3, 8)), None))]
    for cached in (288, 1888):
        ids = torch.randint(3, cfg.vocab_size, (cached + 12,), generator=gen).tolist()
        prefix = [torch.randn(2, cached, cfg.num_kv_heads, cfg.head_dim, generator=gen) for _ in range(cfg.num_layers)]
        cases.append((f"prefill 12 after {cached} cached", lambda m, f, i=ids, p=prefix: lambda: f(m, i, p)))
    rows = [(name, make(before, _before_prefill), make(model, _now_prefill)) for name, make in cases]
    for cached in (288, 1888):
        rows.append((f"prefix cache read, {cached} tokens", _prefix_read(before, cached, now=False),
                     _prefix_read(model, cached, now=True)))
    for batch, context in ((1, 300), (8, 300), (8, 1500), (32, 1000)):
        rows.append((f"decode step, {batch} x {context} context", _decode(before, batch, context),
                     _decode(model, batch, context)))
    return rows


def _p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def measure(model: LlamaModel, repeats: int) -> list[dict]:
    before = Before(model.config, model.weights)
    rows = []
    for name, old, new in _cases(model, before):
        difference = (old() - new()).abs().max().item()
        for _ in range(3):
            old(), new()
        times = alternate(old, new, repeats)
        row = {"case": name, "before_p50_ms": _p50_ms(times["before"]), "now_p50_ms": _p50_ms(times["now"]),
               "max_abs_output_difference": float(f"{difference:.2e}")}
        row["now_vs_before"] = round(row["now_p50_ms"] / row["before_p50_ms"], 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = model_bench_parser(__doc__.splitlines()[0], default_repeats=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    model = load_model(args.model, pathlib.Path(args.cache_dir)).model
    if type(model) is not LlamaModel:
        parser.error(f"{args.model} is not a Llama-family model (its operators are its own)")
    with torch.inference_mode():
        rows = measure(model, args.repeats)
    report = {"model": args.model, "torch_threads": args.torch_threads, "repeats": args.repeats, "results": rows}
    if args.json:
        print(json.dumps(report))
    else:
        for r in rows:
            print(f"{r['case']:<34} before {r['before_p50_ms']:8.2f} ms  now {r['now_p50_ms']:8.2f} ms  "
                  f"x{r['now_vs_before']:.2f}  (outputs differ by {r['max_abs_output_difference']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
