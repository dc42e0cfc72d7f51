"""What the server answers when a request cannot be served: a status and a JSON error.

The body has the shape OpenAI's API uses, so its clients show the message as they would
show OpenAI's own::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}

Messages say what was wrong and how to fix it. They may quote the client's own input back
to it; the server's log never does (it records sizes, statuses and run names only).
"""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_busy",
}


class RequestError(Exception):
    """A request the server refuses (4xx) or failed to serve (5xx).

    ``code`` is a short machine-readable reason, also the ``kind`` label of the
    ``loracli_errors_total`` metric (so it must come from the server, never from the client)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> RequestError:
    return RequestError(400, message, code, param)
