"""Every refusal in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param, code)


def queue_full(retry_after: int) -> ApiError:
    return ApiError(
        429,
        f"the queue is full; retry in about {retry_after} s",
        code="queue_full",
        type="rate_limit_error",
        headers={"Retry-After": str(retry_after)},
    )


def unavailable(message: str, code: str = "shutting_down") -> ApiError:
    return ApiError(503, message, code=code, type="server_error", headers={"Retry-After": "5"})
