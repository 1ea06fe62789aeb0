"""Pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the app in a separate
task and hides client disconnects from streaming responses).

`RequestIdMiddleware`: every request gets an id, stored in `request.state.req_id`: the client's
`x-request-id` (when it is safe to log) with a random suffix, else a new one. The suffix keeps ids
unique, so a client-chosen id can never collide with another request's (another tenant's usage
record, or a request still running). The response echoes the client's id; the internal one
travels to the router and workers, so one grep for the client's id follows it through every log.
"""
from __future__ import annotations

import re
import secrets
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
        given = _given_id(scope)
        req_id = f"{given}.{secrets.token_hex(4)}" if given else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["req_id"] = req_id
        echoed = (given or req_id).encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", echoed)]
            await send(message)

        await self.app(scope, receive, send_with_id)
