"""Executes the scheduler's WorkUnits on the model, one operator per `step()`.

A unit is a batch of prompt pieces; each piece attends causally to its own job's earlier pieces
(chunked prefill) and to itself, MLPs run over all pieces' tokens at once. Hidden states live in
the UnitExecution between operators, and per-job K/V in its JobState across units, so a unit
stopped between two operators resumes without recomputation. When a job's last piece passes a
layer's attention, that layer's complete KV ([2, T, KV, D], contiguous) is reported at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.policy.prefill_scheduler import WorkUnit
from pdserve.workers.model.llama import LlamaModel
from pdserve.workers.model.sampling import TokenLogprob, prompt_logprobs


@dataclass(eq=False)
class JobState:
    req_id: str
    token_ids: list[int]
    # Per layer, the K and V chunks computed so far (one per piece).
    k_chunks: list[list[torch.Tensor]] = field(default_factory=list)
    v_chunks: list[list[torch.Tensor]] = field(default_factory=list)
    logits: torch.Tensor | None = None
    # Set to a number of alternatives to collect every prompt token's logprob (completions' echo).
    prompt_top: int | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def init_layers(self, num_layers: int) -> None:
        if not self.k_chunks:
            self.k_chunks = [[] for _ in range(num_layers)]
            self.v_chunks = [[] for _ in range(num_layers)]

    def seed(self, prefix_kv: list[torch.Tensor]) -> None:
        """Start from a cached prefix: per layer, its [2, C, KV, D] KV (the first chunk)."""
        if prefix_kv[0].shape[1] >= len(self.token_ids):
            raise ValueError("a cached prefix must leave at least the last prompt token to compute")
        if self.prompt_top is not None:
            raise ValueError("prompt logprobs need every prompt position computed")
        self.k_chunks = [[kv[0]] for kv in prefix_kv]
        self.v_chunks = [[kv[1]] for kv in prefix_kv]

    def full_kv(self) -> list[torch.Tensor]:
        """Per layer, the whole prompt's KV [2, T, KV, D] (after the prefill finished)."""
        return [torch.stack(self.past(layer)) for layer in range(len(self.k_chunks))]

    def past(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.k_chunks[layer]:
            return None, None
        return torch.cat(self.k_chunks[layer]), torch.cat(self.v_chunks[layer])


@dataclass(frozen=True)
class LayerReady:
    req_id: str
    layer: int
    kv: torch.Tensor     # [2, T, KV, D], complete and immutable


class UnitExecution:
    def __init__(self, model: LlamaModel, unit: WorkUnit, states: dict[str, JobState]):
        self.model = model
        self.unit = unit
        self._states = [states[p.job.req_id] for p in unit.pieces]
        self._positions = [torch.arange(p.start_token, p.start_token + p.num_tokens) for p in unit.pieces]
        for st in self._states:
            st.init_layers(model.config.num_layers)
        with torch.inference_mode():
            self._hidden = [model.embed(torch.tensor(st.token_ids[p.start_token:p.start_token + p.num_tokens]))
                            for st, p in zip(self._states, unit.pieces)]

    def run_operator(self) -> list[LayerReady]:
        """Run operator `unit.next_op` for every piece; the caller then reports it to the scheduler."""
        layer, is_mlp = divmod(self.unit.next_op, 2)
        ready: list[LayerReady] = []
        with torch.inference_mode():
            if is_mlp:
                merged = self.model.mlp(layer, torch.cat(self._hidden))
                self._hidden = list(torch.split(merged, [h.shape[0] for h in self._hidden]))
            else:
                for i, (st, piece) in enumerate(zip(self._states, self.unit.pieces)):
                    past_k, past_v = st.past(layer)
                    self._hidden[i], k, v = self.model.prefill_attention(
                        layer, self._hidden[i], self._positions[i], past_k, past_v)
                    st.k_chunks[layer].append(k)
                    st.v_chunks[layer].append(v)
                    if piece.start_token + piece.num_tokens == len(st.token_ids):
                        full_k, full_v = st.past(layer)
                        ready.append(LayerReady(st.req_id, layer, torch.stack([full_k, full_v]).contiguous()))
            if self.unit.next_op == self.unit.num_ops - 1:
                for st, piece, h in zip(self._states, self.unit.pieces, self._hidden):
                    end = piece.start_token + piece.num_tokens
                    if st.prompt_top is not None:   # pieces of one job finish in order
                        st.prompt_logprobs += prompt_logprobs(h, self.model.logits, st.token_ids[piece.start_token + 1:end + 1],
                                                              st.prompt_top)
                    if end == len(st.token_ids):
                        st.logits = self.model.logits(h[-1])
        return ready
