"""The gateway's OpenAPI document names its request bodies and errors, filled in with this
deployment's limits, and /docs works offline (its assets come from the gateway itself)."""
import asyncio

import httpx

from pdserve.gateway.app import GatewayDeps, create_app
from pdserve.gateway.generation import Limits


def _get(paths: list[str]) -> list[httpx.Response]:
    deps = GatewayDeps(router=None, tokenizer=None, store=None, limits=Limits("tiny", 512, 64, 320),
                       max_body_bytes=1 << 20, require_api_key=False)

    async def fetch():
        transport = httpx.ASGITransport(app=create_app(deps))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return [await client.get(p) for p in paths]
    return asyncio.run(fetch())


def test_request_bodies_and_errors_are_documented_with_this_deployments_limits():
    doc = _get(["/openapi.json"])[0].json()
    post = doc["paths"]["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert {"400", "401", "404", "413", "429", "503"} <= set(post["responses"])
    assert post["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    body = doc["components"]["schemas"]["CompletionRequest"]
    assert body["additionalProperties"] is False and body["properties"]["model"]["enum"] == ["tiny"]
    assert body["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 64
    assert '"maximum": 319' in str(body["properties"]["prompt"]).replace("'", '"')
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in chat["required"]


def test_docs_page_and_its_assets_are_served_locally():
    page, js, css = _get(["/docs", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"])
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert js.status_code == 200 and len(js.content) > 100_000
    assert css.status_code == 200
