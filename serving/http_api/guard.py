"""The server's front door, as one pure ASGI middleware: request metrics, API key (401), payload limit (413)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from modelship.serving.dataplane import authorized
from modelship.serving.errors import RequestError
from modelship.serving.metrics import metrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# no API key needed: health for load balancers, and the API's description (no model data, only its name and shape)
OPEN_PATHS = frozenset(
    {"/health", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)
KNOWN_PATHS = frozenset({"/", "/predict", "/info", "/metrics", "/v2", "/v2/repository/index", *OPEN_PATHS})
MODEL_PATH = re.compile(r"^/v2/models/[^/]+(?:/versions/[^/]+)?(/ready|/infer|/predict)?$")
REPOSITORY_PATH = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")


class PayloadTooLarge(RequestError):
    """Raised while the body streams in, once it passes the limit; endpoints answer it like any RequestError."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 413)


def route_label(path: str) -> str:
    """A bounded set of labels: URL templates, never raw paths (model names would explode the cardinality)."""
    if path in KNOWN_PATHS:
        return path
    m = MODEL_PATH.match(path)
    if m:
        return "/v2/models/{name}" + (m.group(1) or "")
    m = REPOSITORY_PATH.match(path)
    if m:
        return "/v2/repository/models/{name}/" + m.group(1)
    return "other"


async def send_error(send: Send, status: int, message: str, close: bool = False) -> None:
    """A complete {"error": message} response, sent straight from the middleware."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
Handler = Callable[[dict[bytes, bytes], bytes], Awaitable[Answer]]
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer; never sent, only counted
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass(frozen=True)
class Route:
    """A request the guard answers itself: its handler, and the largest body it may have (with why, for the 413)."""

    handler: Handler
    max_bytes: int | None = None  # None: the server's payload limit
    why: str = ""


def error_answer(e: Exception) -> Answer:
    """The one mapping of an exception to what the client gets: a RequestError is its 4xx (or 5xx) with
    {"error": message}; anything else is logged and answered 500."""
    if isinstance(e, RequestError):
        return e.status, JSON_HEADERS, json.dumps({"error": e.message}).encode()
    log.error("unhandled error answering a request", exc_info=e)
    return 500, JSON_HEADERS, json.dumps({"error": "internal server error; see the server log"}).encode()


class Guard:
    """Counts and times every request; checks the API key; refuses bodies over the limit without reading them; and
    answers the hot routes itself (`fast`: the spec's `fast_route`), without FastAPI's per-request routing."""

    def __init__(
        self, app: Callable[..., Awaitable[None]], *, api_key: str | None, max_bytes: int,
        fast: Callable[[Scope, dict[bytes, bytes]], Route | None] | None = None,
    ) -> None:  # fmt: skip
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = route_label(scope["path"])
        status = 500
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            headers = dict(scope["headers"])
            if self.api_key is not None and scope["path"] not in OPEN_PATHS and not authorized(self.api_key, headers):
                await send_error(
                    send_tracked, 401, "missing or wrong API key; send it as X-API-Key or Authorization: Bearer"
                )
                return
            route_ = self.fast(scope, headers) if self.fast is not None else None
            limit = self.max_bytes
            why = "payload limit (--max-payload-mb)"
            if route_ is not None and route_.max_bytes is not None and route_.max_bytes < limit:
                limit, why = route_.max_bytes, route_.why
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await send_error(send_tracked, 413, too_large(int(length), limit, why), close=True)
                return
            received = 0

            async def receive_limited() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(too_large(received, limit, why))
                return message

            try:
                if route_ is not None:
                    status = await answer(route_.handler, headers, receive_limited, send_tracked) or status
                else:
                    await self.app(scope, receive_limited, send_tracked)
            except PayloadTooLarge as e:  # from a route that did not answer it itself
                if not started:
                    await send_error(send_tracked, 413, e.message, close=True)
        finally:
            m = metrics()
            m.requests.labels(route, str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)


def too_large(size: int, limit: int, why: str) -> str:
    return f"the request body ({size} bytes or more) is over the {limit} byte {why}"


async def answer(handler: Handler, headers: dict[bytes, bytes], receive: Receive, send: Send) -> int | None:
    """Read the whole body, run `handler`, send its answer; 499 (nothing sent) when the client hung up first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            log.debug("the client disconnected before its request arrived")
            return CLIENT_CLOSED
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        status, extra, body = await handler(headers, b"".join(chunks))
    except Exception as e:
        status, extra, body = error_answer(e)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
    return None
