"""The gateway's OpenAPI document and its `/docs` page.

Routes read their bodies themselves (size cap, strict UTF-8, OpenAI-format errors), so FastAPI
cannot see the request models; this module publishes them: each completion route names its body
schema (the pydantic model the route validates with, so the document and the validation cannot
drift apart) and every error status with OpenAI's error body. The served model name and the
`max_tokens` limit of this deployment are filled in. `/docs` is Swagger UI from the
`swagger-ui-bundle` package, served from the gateway itself: no CDN, so it works offline.
"""
from __future__ import annotations

import pathlib

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from pdserve.gateway.generation import Limits
from pdserve.gateway.schemas import ChatCompletionRequest, CompletionRequest

REQUEST_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error format, used for every 4xx and 5xx."""
    error: ErrorDetail


def _error(description: str) -> dict:
    return {"description": description, "model": ErrorResponse}


KEYED_ERRORS = {401: _error("Missing or unknown API key (when keys are required)")}
COMPLETION_RESPONSES = {
    200: {"description": "A completion object, or server-sent events when `stream` is true",
          "content": {"application/json": {}, "text/event-stream": {}}},
    400: _error("Invalid or unsupported request fields, or a prompt beyond the context"),
    **KEYED_ERRORS,
    404: _error("The model is not served here"),
    413: _error("Request body too large"),
    429: _error("Over the gateway's capacity or the key's rate limit (see Retry-After)"),
    502: _error("The cluster ended the request without output"),
    503: _error("No worker can serve the request now (see Retry-After)"),
}


def body_of(path: str) -> dict:
    """`openapi_extra` for a route whose body is REQUEST_MODELS[path]."""
    ref = {"$ref": _REF.format(model=REQUEST_MODELS[path].__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _request_schema(model: type[BaseModel], limits: Limits, components: dict) -> dict:
    schema = model.model_json_schema(ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    # Unknown fields are refused (schemas.check_fields): say so, so clients and fuzzers know.
    schema["additionalProperties"] = False
    props = schema["properties"]
    props["model"]["enum"] = [*limits.models, *([limits.routed_model] if limits.routed_model else [])]
    if "prompt" in props and limits.vocab_size:
        _bound_integers(props["prompt"], limits.vocab_size - 1)
    props["min_tokens"]["maximum"] = limits.max_tokens_limit
    for name in ("max_tokens", "max_completion_tokens"):
        if name in props:
            props[name] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": limits.max_tokens_limit},
                                     {"type": "null"}], "default": None}
    return schema


def _bound_integers(schema, maximum: int) -> None:
    """Token ids: every integer in a prompt schema is at most `maximum`."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = maximum
        for value in schema.values():
            _bound_integers(value, maximum)
    elif isinstance(schema, list):
        for item in schema:
            _bound_integers(item, maximum)


def install(app: FastAPI, limits: Limits) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="OpenAI-compatible completions served by disaggregated prefill "
                                          "and decode workers")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS.values():
                components[model.__name__] = _request_schema(model, limits, components)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    _install_docs(app)


def _install_docs(app: FastAPI) -> None:
    assets = pathlib.Path(swagger_ui_bundle.swagger_ui_path)
    app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")
