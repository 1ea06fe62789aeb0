"""Models with different tokenizers behind one gateway (IC-Cache's small and large models need not
share one): each request is tokenized, and its context checked, for the model it names.

The router here is a stand-in service behind the real InProcessRouter that records what reached
it; the real router and workers behind the gateway are tested in tests/integration."""
import asyncio

import httpx
import pytest

from pdserve.gateway.app import GatewayDeps, create_app
from pdserve.gateway.generation import Limits
from pdserve.gateway.router_client import InProcessRouter
from pdserve.store import Store
from pdserve.v1 import worker_pb2
from pdserve.workers.model.loader import SMOLLM2_NAME, load_tokenizer
from pdserve.workers.model.tokenizer import ByteTokenizer

PROMPT = "Which tokenizer reads this sentence?"


class _RecordingRouter:
    """Answers one token and keeps every RouteRequest."""

    def __init__(self):
        self.requests = []

    async def Generate(self, request, context):
        self.requests.append(request)
        yield worker_pb2.TokenChunk(req_id=request.req_id, token_ids=[1], text="x", num_generated_tokens=1,
                                    finish_reason=worker_pb2.FINISH_REASON_LENGTH)


@pytest.fixture(scope="module")
def smollm2_tokenizer(model_cache_dir):
    return load_tokenizer(SMOLLM2_NAME, model_cache_dir)


def test_each_model_gets_its_own_tokens_and_context_limit(tmp_path, smollm2_tokenizer):
    store = Store(f"sqlite:///{tmp_path}/g.db")
    store.migrate()
    router = _RecordingRouter()
    deps = GatewayDeps(router=InProcessRouter(router, 1), tokenizer=ByteTokenizer(), store=store,
                       limits=Limits("tiny", 64, 16, ByteTokenizer.VOCAB_SIZE, extra_models=(SMOLLM2_NAME,),
                                     extra_model_limits={SMOLLM2_NAME: (8192, 49152)}),
                       max_body_bytes=1 << 20, require_api_key=False,
                       extra_tokenizers={SMOLLM2_NAME: smollm2_tokenizer})

    async def calls():
        transport = httpx.ASGITransport(app=create_app(deps))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            out = []
            for model, prompt in (("tiny", PROMPT), (SMOLLM2_NAME, PROMPT), ("tiny", PROMPT * 2),
                                  (SMOLLM2_NAME, PROMPT * 2)):
                out.append(await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                                       "max_tokens": 1}))
            return out
    small, other, too_long, fits = asyncio.run(calls())
    assert small.status_code == other.status_code == fits.status_code == 200
    sent = {r.model: list(r.prompt_token_ids) for r in router.requests[:2]}
    assert sent["tiny"] == ByteTokenizer().encode(PROMPT)
    assert sent[SMOLLM2_NAME] == smollm2_tokenizer.encode(PROMPT) != sent["tiny"]
    assert small.json()["usage"]["prompt_tokens"] == len(sent["tiny"])
    assert other.json()["usage"]["prompt_tokens"] == len(sent[SMOLLM2_NAME])
    # 72 bytes exceed tiny's 64-token context; the same text is ~16 SmolLM2 tokens of its 8,192.
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "64 tokens" in too_long.json()["error"]["message"]
