"""Errors in OpenAI's JSON format: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from fastapi.responses import JSONResponse


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, headers=self.headers, content=self.body())

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def overloaded(status: int, message: str, retry_after_s: int) -> OpenAIError:
    type_ = "rate_limit_error" if status == 429 else "service_unavailable"
    return OpenAIError(status, message, type_, code="overloaded", headers={"Retry-After": str(retry_after_s)})
