"""uvicorn's HTTP protocol with read timeouts: a client that is slow to send its headers or its body is cut off.

uvicorn closes idle keep-alive connections, but has no limit on how long a request may take to arrive: 200
connections sending one header byte a second stayed open indefinitely, each holding a descriptor and a parser. Here
a request's headers must arrive within `header_timeout` seconds (counted from the connection, or from the first byte
of the next request on a kept-alive one) and its body within `body_timeout` seconds of its headers; otherwise the
client gets 408 with `{"error"}` and the connection is closed (nginx's client_header_timeout and
client_body_timeout).

A sweep every half second looks at each open connection's state as uvicorn keeps it, and nothing runs per request:
hooks on the parser's callbacks cost the API servers ~10 us of CPU per request (BENCHMARKS.md, serving). A timeout
therefore fires up to half a second late.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

SWEEP = 0.5  # seconds between looks


def protocol(header_timeout: float, body_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these timeouts."""

    class TimedProtocol(HttpToolsProtocol):
        open: ClassVar[set[TimedProtocol]] = set()
        sweeper: ClassVar[asyncio.TimerHandle | None] = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # what this connection waits for from its client, on which request, since when: a new one, headers
            self.waiting: tuple[str, int] | None = ("headers", id(None))
            self.since = time.monotonic()
            TimedProtocol.open.add(self)
            if TimedProtocol.sweeper is None:
                TimedProtocol.sweeper = self.loop.call_later(SWEEP, sweep, self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            TimedProtocol.open.discard(self)
            super().connection_lost(exc)

        def waiting_for(self) -> str | None:
            """ "headers", "body", or None when the server has the turn or the connection idles under uvicorn's
            keep-alive timeout (which data from the client cancels: then the next request's headers are due)."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return "headers" if self.timeout_keep_alive_task is None else None
            return "body" if cycle.more_body and not cycle.response_started else None

        def check(self, now: float) -> None:
            phase = self.waiting_for()
            state = None if phase is None else (phase, id(self.cycle))
            if state != self.waiting:
                self.waiting, self.since = state, now
            elif phase is not None and now - self.since > (header_timeout if phase == "headers" else body_timeout):
                self.cut(phase)

        def cut(self, phase: str) -> None:
            """Answer 408 and close."""
            if not self.transport.is_closing():
                limit = header_timeout if phase == "headers" else body_timeout
                self.transport.write(response_408(f"the request did not send its {phase} within {limit:g}s"))
                self.transport.close()

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        for conn in list(TimedProtocol.open):
            conn.check(now)
        TimedProtocol.sweeper = loop.call_later(SWEEP, sweep, loop) if TimedProtocol.open else None

    return TimedProtocol


def response_408(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body
