"""The gateway's FastAPI app, assembled: routes (routes.py), dependencies (dependencies.py), the
request-id middleware (middleware.py, pure ASGI) and error handlers that answer in OpenAI's error
format with the status code OpenAI would use."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve import __version__
from pdserve.gateway import openapi
from pdserve.gateway.dashboard import DashboardAccess
from pdserve.gateway.dashboard import router as dashboard_routes
from pdserve.gateway.dependencies import GatewayDeps
from pdserve.gateway.errors import OpenAIError
from pdserve.gateway.iccache_routes import PoolLoads
from pdserve.gateway.iccache_routes import router as iccache_router
from pdserve.gateway.live_window import LiveWindow
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.middleware import RequestIdMiddleware
from pdserve.gateway.recording import RequestRecorder
from pdserve.gateway.routes import router

__all__ = ["GatewayDeps", "create_app"]
log = logging.getLogger("pdserve.gateway")


async def _openai_error(request: Request, exc: OpenAIError):
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return OpenAIError(exc.status_code, str(exc.detail), type_).response()


async def _unexpected(request: Request, exc: Exception):
    # A bug, not a client error: logged with its traceback, answered in OpenAI's format.
    log.error("request %s failed: %r", getattr(request.state, "req_id", "?"), exc, exc_info=exc)
    return OpenAIError(500, "The server had an error while processing your request", "server_error").response()


def create_app(deps: GatewayDeps, metrics: GatewayMetrics | None = None,
               dashboard: DashboardAccess | None = None) -> FastAPI:
    """`dashboard`: who may see /dashboard; the default serves it to anyone (a loopback gateway)."""
    app = FastAPI(title="pdserve gateway", version=__version__, docs_url=None, redoc_url=None)
    app.state.deps = deps
    app.state.metrics = metrics or GatewayMetrics()
    app.state.live_window = LiveWindow(deps.clock)
    app.state.dashboard_access = dashboard or DashboardAccess()
    app.state.recorder = RequestRecorder(deps.store, app.state.metrics, app.state.live_window, deps.iccache)
    app.state.pool_loads = PoolLoads()
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.include_router(dashboard_routes)
    app.include_router(iccache_router)
    openapi.install(app, deps.limits)
    app.add_middleware(RequestIdMiddleware)
    return app
