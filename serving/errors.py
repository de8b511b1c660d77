"""The server's one error type and what its status means on each protocol: a client mistake is a RequestError with
the HTTP status that says what kind (400, 404, 413, ...) and a message that names what was wrong and what was
expected; HTTP answers it as {"error": message} with that status (http_api.answers), gRPC as the status code
`GRPC_CODES` maps it to, with the same message.
"""

from __future__ import annotations


class RequestError(Exception):
    """A client mistake: HTTP `status` with a message that says what was wrong and what was expected. Where the
    message names a call to make next, `grpc` is the same message naming the gRPC call (each protocol's clients are
    told their own protocol's calls)."""

    def __init__(self, message: str, status: int = 400, grpc: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.grpc = grpc or message


# HTTP status -> the gRPC status code with the same meaning (the names of grpc.StatusCode, so this module needs no grpc)
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
