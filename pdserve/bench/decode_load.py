"""Background decode load for cluster benchmarks: long streamed completions kept running, so
the decode workers step a batch while the measured requests pass (as in production, where a
new request's KV reservation and first token meet decode workers that are never idle).

Each stream asks for `output_tokens` tokens after a prompt of `context_tokens` (long contexts
make each decode step longer and its chunks fewer, so the load weighs on the decode workers'
compute more than on the gateway and router relaying tokens), and starts again when it ends.
"""
from __future__ import annotations

import json
import random
import threading
import time

import httpx


class DecodeLoad:
    def __init__(self, url: str, model: str, num_streams: int, context_tokens: int = 1024,
                 output_tokens: int = 1024, seed: int = 7):
        self.url, self.model = url, model
        self.num_streams = num_streams
        self.context_tokens, self.output_tokens = context_tokens, output_tokens
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._first = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.chunks = 0           # streamed so far, all streams (a chunk per decode step)
        self.errors: dict[str, int] = {}

    def __enter__(self) -> "DecodeLoad":
        prompts = [[self._rng.randrange(256) for _ in range(self.context_tokens)] for _ in range(self.num_streams)]
        for ids in prompts:
            thread = threading.Thread(target=self._stream_forever, args=(ids,), daemon=True, name="decode-load")
            thread.start()
            self._threads.append(thread)
        for _ in prompts:       # every stream is decoding before anything is measured
            if not self._first.acquire(timeout=300):
                raise RuntimeError("a decode-load stream produced no token in 300 s")
        self._started_s, self._started_chunks = time.monotonic(), self.chunks
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed_s = time.monotonic() - self._started_s
        self.measured_chunks = self.chunks - self._started_chunks
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def report(self) -> dict:
        return {"streams": self.num_streams, "context_tokens": self.context_tokens,
                "output_tokens": self.output_tokens,
                "chunks_per_s": round(self.measured_chunks / self.elapsed_s, 1) if self.elapsed_s else None,
                "errors": dict(self.errors)}

    def _stream_forever(self, ids: list[int]) -> None:
        body = {"model": self.model, "prompt": ids, "max_tokens": self.output_tokens, "ignore_eos": True,
                "stream": True}
        signalled = False
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self._stop.is_set():
                try:
                    signalled = self._one(http, body, signalled)
                except (httpx.HTTPError, ValueError) as exc:
                    with self._lock:
                        self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                    if self._stop.wait(0.5):    # a failing cluster is not hammered in a tight loop
                        return

    def _one(self, http: httpx.Client, body: dict, signalled: bool) -> bool:
        with http.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if self._stop.is_set():
                    return signalled     # leaving the block closes the stream: the server cancels it
                if not line.startswith("data: {"):
                    continue
                if json.loads(line[len("data: "):])["choices"]:
                    with self._lock:
                        self.chunks += 1
                    if not signalled:
                        self._first.release()
                        signalled = True
        return signalled
