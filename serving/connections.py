"""uvicorn's HTTP protocol with read timeouts: a client that is slow to send its headers or its body is cut off.

uvicorn closes idle keep-alive connections, but has no limit on how long a request may take to arrive: 200
connections sending one header byte a second stayed open indefinitely, each holding a descriptor and a parser. Here
a request's headers must arrive within `header_timeout` seconds of its first byte (or of the connection, for one
that sends nothing) and its body within `body_timeout` seconds of its headers; otherwise the client gets 408 with
`{"error"}` and the connection is closed (nginx's client_header_timeout and client_body_timeout).

One sweep a second over the open connections checks them, rather than a timer per request, so the hot path pays
one clock read per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

SWEEP = 0.5  # seconds between checks: a timeout fires within this much of its time


def protocol(header_timeout: float, body_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these timeouts."""

    class TimedProtocol(HttpToolsProtocol):
        open: ClassVar[set[TimedProtocol]] = set()
        sweeper: ClassVar[asyncio.TimerHandle | None] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # waiting for: "headers" since `since`, "body" since `since`, or None (a request is being answered, or
            # the connection is idle between requests, where uvicorn's keep-alive timeout applies)
            self.phase: str | None = "headers"
            self.since = time.monotonic()
            TimedProtocol.open.add(self)
            if TimedProtocol.sweeper is None:
                TimedProtocol.sweeper = self.loop.call_later(SWEEP, sweep, self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            TimedProtocol.open.discard(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.phase, self.since = "headers", time.monotonic()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self.phase, self.since = "body", time.monotonic()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.phase = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.phase == "headers":  # uvicorn answered before the body came (an early error): nothing to time
                self.phase = None

        def timed_out(self, now: float) -> bool:
            if self.phase == "headers":
                return now - self.since > header_timeout
            return self.phase == "body" and now - self.since > body_timeout

        def cut(self) -> None:
            """Answer 408 when nothing has been answered on this request yet, and close."""
            cycle = getattr(self, "cycle", None)
            if not self.transport.is_closing():
                if cycle is None or cycle.response_complete or not cycle.response_started:
                    limit = header_timeout if self.phase == "headers" else body_timeout
                    what = "its headers" if self.phase == "headers" else "its body"
                    self.transport.write(response_408(f"the request did not send {what} within {limit:g}s"))
                self.transport.close()
            self.phase = None

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in [c for c in TimedProtocol.open if c.timed_out(now)]:
            conn.cut()
        TimedProtocol.sweeper = loop.call_later(SWEEP, sweep, loop) if TimedProtocol.open else None

    return TimedProtocol


def response_408(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


__all__: list[Any] = ["protocol"]
