"""Pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the app in a separate
task and hides client disconnects from streaming responses).

`RequestIdMiddleware`: every request gets an id (the client's `x-request-id` when it is safe to
log, else a new one), stored in `request.state.req_id` and echoed on the response; the same id
travels to the router and workers, so one grep follows a request through every log.
"""
from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,96}$")


def _given_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            return given if _REQUEST_ID.match(given) else ""
    return ""


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        req_id = _given_id(scope) or f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["req_id"] = req_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", req_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)
