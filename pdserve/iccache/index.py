"""Nearest cached examples by cosine similarity, in a usearch HNSW index kept beside the store
(rebuilt from it at start; the store is the source of truth)."""
from __future__ import annotations

import numpy as np
from usearch.index import Index


class VectorIndex:
    def __init__(self, dim: int):
        self.dim = dim
        self._index = Index(ndim=dim, metric="cos", dtype="f32")

    def __len__(self) -> int:
        return len(self._index)

    def add(self, example_id: int, vector: np.ndarray) -> None:
        self._index.add(example_id, np.asarray(vector, dtype=np.float32))

    def remove(self, example_id: int) -> None:
        if example_id in self._index:
            self._index.remove(example_id)

    def nearest(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to k (example id, cosine similarity), most similar first."""
        if len(self._index) == 0:
            return []
        matches = self._index.search(np.asarray(vector, dtype=np.float32), min(k, len(self._index)))
        return [(int(key), 1.0 - float(dist)) for key, dist in zip(matches.keys, matches.distances)]
