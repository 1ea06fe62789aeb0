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
    # Per layer, one [2, T, KV, D] buffer of the whole prompt, written chunk by chunk; its first
    # `filled[layer]` positions are computed (or came from a cached prefix). Attention reads the
    # filled part in place and the finished buffer is the layer's transfer: a prompt's KV is not
    # concatenated again at every chunk and every layer (with a cached 1,888-token prefix that
    # made a 12-token prefill of tiny take 3.5x its cold time).
    kv: list[torch.Tensor | None] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None
    # Set to a number of alternatives to collect every prompt token's logprob (completions' echo).
    prompt_top: int | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def init_layers(self, num_layers: int) -> None:
        if not self.filled:
            self.kv = [None] * num_layers
            self.filled = [0] * num_layers

    def layer_buffer(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """The layer's [2, T, KV, D] buffer, made on first use with `like`'s [KV, D] and dtype."""
        if self.kv[layer] is None:
            self.kv[layer] = like.new_empty((2, len(self.token_ids), *like.shape[1:]))
        return self.kv[layer]

    def seed(self, prefix: "CachedPrefix") -> None:
        """Start from a cached prefix: its buffers become this prompt's, nothing is copied."""
        if prefix.num_tokens >= len(self.token_ids):
            raise ValueError("a cached prefix must leave at least the last prompt token to compute")
        if any(kv.shape[1] != len(self.token_ids) for kv in prefix.layers):
            raise ValueError(f"a cached prefix's buffers must hold the whole {len(self.token_ids)}-token prompt")
        if self.prompt_top is not None:
            raise ValueError("prompt logprobs need every prompt position computed")
        self.kv = list(prefix.layers)
        self.filled = [prefix.num_tokens] * len(prefix.layers)


@dataclass(frozen=True)
class CachedPrefix:
    """A prompt's KV buffers ([2, T, KV, D] per layer, T its length) whose first `num_tokens`
    positions hold a cached prefix: the prefix cache gathers into them and the prefill fills the
    rest in place, so the prefix is copied once, from the pool."""
    layers: list[torch.Tensor]
    num_tokens: int

    @classmethod
    def of(cls, prefix_layers: list[torch.Tensor], num_prompt_tokens: int) -> "CachedPrefix":
        """From per-layer [2, C, KV, D] KV of a prompt's first C tokens (tests, profiling)."""
        cached = prefix_layers[0].shape[1]
        layers = []
        for kv in prefix_layers:
            buf = kv.new_empty((2, num_prompt_tokens, *kv.shape[2:]))
            buf[:, :cached] = kv
            layers.append(buf)
        return cls(layers, cached)


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
                    if (done := self._attend(i, st, piece, layer)) is not None:
                        ready.append(done)
            if self.unit.next_op == self.unit.num_ops - 1:
                for st, piece, h in zip(self._states, self.unit.pieces, self._hidden):
                    end = piece.start_token + piece.num_tokens
                    if st.prompt_top is not None:   # pieces of one job finish in order
                        st.prompt_logprobs += prompt_logprobs(h, self.model.logits, st.token_ids[piece.start_token + 1:end + 1],
                                                              st.prompt_top)
                    if end == len(st.token_ids):
                        st.logits = self.model.logits(h[-1])
        return ready

    def _attend(self, i: int, st: JobState, piece, layer: int) -> LayerReady | None:
        """One piece's attention at `layer`; the layer's KV once the piece completes the prompt."""
        if st.filled[layer] != piece.start_token:
            raise RuntimeError(f"{st.req_id}: layer {layer} holds {st.filled[layer]} tokens, the piece "
                               f"starts at {piece.start_token}")
        self._hidden[i] = self.model.prefill_attention_into(layer, self._hidden[i], self._positions[i], st,
                                                            piece.start_token)
        st.filled[layer] = piece.start_token + piece.num_tokens
        return LayerReady(st.req_id, layer, st.kv[layer]) if st.filled[layer] == len(st.token_ids) else None
