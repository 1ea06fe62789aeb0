"""The serving policies `pdserve bench iccache` compares, as clients of one real gateway.

Every policy answers a trivia question with the same text layout (`prompting.text_prompt`: the
fixed preamble, its shots, the question), greedy, stopping at a newline:
- `always_large` / `always_small`: the large or the small model by name, no examples;
- `small_random_examples`: the small model with `k` examples drawn at random from the pool;
- `semantic_cache_T`: return the answer of the most similar pooled question when the cosine
  similarity is at least T, else ask the large model and cache its answer (a plain semantic cache);
- `iccache`: the routed name; the gateway's IC-Cache chooses, and the client rates each answer by
  exact match (the feedback IC-Cache learns from).
A policy returns an `Outcome`; HTTP errors are counted in it, never raised."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from pdserve.bench.trivia import Question, exact_match
from pdserve.iccache.index import VectorIndex
from pdserve.iccache.prompting import text_prompt

MAX_TOKENS = 16
MAX_RETRIES = 1000       # of one request's 429s and 503s: in effect until answered (the run is finite)
CACHE_MODEL = "cache"          # an Outcome's model when a semantic cache answered


@dataclass
class Outcome:
    correct: bool = False
    answer: str = ""
    model: str = ""
    num_examples: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    retries: int = 0             # 429s and 503s answered by waiting Retry-After and asking again
    latency_s: float = 0.0
    arrival_s: float = 0.0       # since the replay started
    done_s: float = 0.0


@dataclass
class Answered:
    """A pooled question with the large model's answer: an example for every policy that uses one."""
    question: Question
    answer: str


class Gateway:
    def __init__(self, http: httpx.AsyncClient, preamble: str):
        self.http = http
        self.preamble = preamble
        self._ratings: set[asyncio.Future] = set()

    async def complete(self, model: str, prompt: str, out: Outcome) -> tuple[str, str]:
        """The answer text and response id (empty on an error, which `out.error` then names). A
        429 or 503 is retried after its Retry-After, as the openai client does, so every question
        is answered and a policy's overload shows as latency and retries, not as wrong answers."""
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": ["\n"]}
        while True:
            try:
                r = await self.http.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                out.error = type(exc).__name__
                return "", ""
            if r.status_code not in (429, 503) or out.retries >= MAX_RETRIES:
                break
            out.retries += 1
            await asyncio.sleep(float(r.headers.get("retry-after", 1)))
        if r.status_code != 200:
            out.error = str(r.status_code)
            return "", ""
        body = r.json()
        usage = body.get("usage") or {}
        out.model = r.headers.get("x-pdserve-model", model)
        out.num_examples = int(r.headers.get("x-pdserve-iccache-examples", 0))
        out.prompt_tokens, out.completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        return body["choices"][0]["text"].strip(), body["id"]

    def rate_soon(self, response_id: str, correct: bool) -> None:
        """Feedback after the answer, outside its latency (as a user rates what they already read)."""
        task = asyncio.ensure_future(self._rate(response_id, correct))
        self._ratings.add(task)
        task.add_done_callback(self._ratings.discard)

    async def _rate(self, response_id: str, correct: bool) -> None:
        try:
            await self.http.post("/v1/feedback", json={"response_id": response_id, "rating": float(correct)})
        except httpx.HTTPError:
            pass     # feedback is best effort, as a client's would be; the answer already counted

    async def settle(self) -> None:
        while self._ratings:
            await asyncio.gather(*list(self._ratings))


async def ask_model(gw: Gateway, model: str, q: Question, shots: list[Answered] = ()) -> Outcome:
    out = Outcome()
    prompt = text_prompt(q.text, [(a.question.text, a.answer) for a in shots], gw.preamble)
    answer, _ = await gw.complete(model, prompt, out)
    out.answer = answer
    out.correct = not out.error and exact_match(answer, q.aliases)
    out.num_examples = len(shots)
    return out


async def ask_routed(gw: Gateway, routed_model: str, q: Question, learn: bool = True) -> Outcome:
    out = Outcome()
    answer, response_id = await gw.complete(routed_model, q.text, out)
    if out.error:
        return out
    out.answer, out.correct = answer, exact_match(answer, q.aliases)
    if learn:
        gw.rate_soon(response_id, out.correct)
    return out


class RandomExamples:
    def __init__(self, pool: list[Answered], k: int, seed: int):
        self.pool, self.k, self.rng = pool, k, random.Random(seed)

    async def ask(self, gw: Gateway, small_model: str, q: Question) -> Outcome:
        return await ask_model(gw, small_model, q, self.rng.sample(self.pool, min(self.k, len(self.pool))))


class SemanticCache:
    """Answers from the most similar cached question at or above `threshold`, else the large model
    (whose answer joins the cache). Embeddings are MiniLM's, as IC-Cache's are."""

    def __init__(self, embedder, threshold: float, pool: list[Answered], pool_vectors):
        self.embedder, self.threshold = embedder, threshold
        self.answers = [a.answer for a in pool]
        self.index = VectorIndex(embedder.dim)
        for i, vec in enumerate(pool_vectors):
            self.index.add(i, vec)

    async def ask(self, gw: Gateway, large_model: str, q: Question) -> Outcome:
        vec = (await asyncio.to_thread(self.embedder.embed, [q.text]))[0]
        hit = self.index.nearest(vec, 1)
        if hit and hit[0][1] >= self.threshold:
            answer = self.answers[hit[0][0]]
            return Outcome(correct=exact_match(answer, q.aliases), answer=answer, model=CACHE_MODEL)
        out = Outcome()
        answer, _ = await gw.complete(large_model, text_prompt(q.text, preamble=gw.preamble), out)
        if not out.error:
            out.answer, out.correct = answer, exact_match(answer, q.aliases)
            self.index.add(len(self.answers), vec)
            self.answers.append(answer)
        return out


async def replay(ask, questions: list[Question], arrivals_s: list[float]) -> list[Outcome]:
    """Open loop: question i is sent at arrivals_s[i] (seconds from now) whatever is in flight."""
    t0 = time.perf_counter()

    async def one(q: Question, at_s: float) -> Outcome:
        await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - t0)))
        started = time.perf_counter()
        out = await ask(q)
        out.done_s = time.perf_counter() - t0
        out.latency_s, out.arrival_s = out.done_s - (started - t0), started - t0
        return out

    return list(await asyncio.gather(*(one(q, at) for q, at in zip(questions, arrivals_s))))


async def closed_loop(ask, questions: list[Question], concurrency: int) -> tuple[list[Outcome], float]:
    """Each of `concurrency` clients asks its next question when its last one is answered."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, q in enumerate(questions):
        queue.put_nowait((i, q))
    outcomes: list[Outcome | None] = [None] * len(questions)

    async def client() -> None:
        while not queue.empty():
            i, q = queue.get_nowait()
            outcomes[i] = await ask(q)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - t0
