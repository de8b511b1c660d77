"""The server's front door, as one pure ASGI middleware: request metrics, API key (401), payload limit (413), and
the hot POST routes answered in front of FastAPI. Which route a request is, whether it needs the key and its metric
label all come from the route table (http_api.routes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from modelship.serving.dataplane import authorized
from modelship.serving.errors import RequestError
from modelship.serving.http_api import routes
from modelship.serving.http_api.answers import CLIENT_CLOSED, Answer, error_answer, not_allowed, send_error, too_large
from modelship.serving.metrics import metrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[dict[bytes, bytes], bytes], Awaitable[Answer]]


class PayloadTooLarge(RequestError):
    """Raised while the body streams in, once it passes the limit; endpoints answer it like any RequestError."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 413)


@dataclass(frozen=True)
class Fast:
    """A request the Guard answers itself: its handler, and the largest body it may have (with why, for the 413)."""

    handler: Handler
    max_bytes: int | None = None  # None: the server's payload limit
    why: str = ""


class Guard:
    """Counts and times every request; checks the API key; refuses bodies over the limit without reading them; and
    answers the fast routes itself (`fast`: the spec's `fast_route`), without FastAPI's per-request routing."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        *,
        api_key: str | None,
        max_bytes: int,
        fast: Callable[[routes.Route, dict[str, str], dict[bytes, bytes]], Fast] | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        self.fast = fast

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        found = routes.match(scope["path"])
        route, params = found if found is not None else (None, {})
        status = 500
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            headers = dict(scope["headers"])
            refusal = self.refusal(route, scope, headers)
            if refusal is not None:
                await send_error(send_tracked, *refusal)
                return
            fast = None
            if route is not None and route.fast and self.fast is not None and scope["method"] == "POST":
                fast = self.fast(route, params, headers)
            limit, why = self.max_bytes, "payload limit (--max-payload-mb)"
            if fast is not None and fast.max_bytes is not None and fast.max_bytes < limit:
                limit, why = fast.max_bytes, fast.why
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
                if fast is not None:
                    status = await answer(fast.handler, headers, receive_limited, send_tracked) or status
                else:
                    await self.app(scope, receive_limited, send_tracked)
            except PayloadTooLarge as e:  # from a route that did not answer it itself
                if not started:
                    await send_error(send_tracked, 413, e.message, close=True)
        finally:
            m = metrics()
            label = route.label if route is not None else "other"
            m.requests.labels(label, str(status)).inc()
            m.latency.labels(label).observe(time.perf_counter() - start)

    def refusal(self, route: routes.Route | None, scope: Scope, headers: dict[bytes, bytes]) -> Refusal | None:
        """(status, message, close, headers) when the Guard refuses a request before anything reads it: a missing or
        wrong API key (401), a method its route does not take (405, with Allow)."""
        key = self.api_key
        if key is not None and not (route is not None and route.open) and not authorized(key, headers):
            return 401, "missing or wrong API key; send it as X-API-Key or Authorization: Bearer", False, []
        if route is not None and route.handler is not None and scope["method"] not in route.methods:
            allow = [(b"allow", ", ".join(route.methods).encode())]
            return 405, not_allowed(scope["method"], scope["path"], route.methods), False, allow
        return None


Refusal = tuple[int, str, bool, list[tuple[bytes, bytes]]]


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
    head = [(b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
    return None
