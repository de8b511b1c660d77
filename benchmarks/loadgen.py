"""A lean closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending one request after another.

Written on raw asyncio streams with the request bytes built once, so it costs far less CPU per request than an HTTP
client library would; on a 2-core machine the load generator shares the cores with the server it measures.

Throughput is the answers that arrive within the measured window, whenever they were sent: counting only requests
both sent and answered inside it drops about one per connection, which understates a server whose answers take
0.5 s by 5% in a 10 s window (and one whose answers take 20 ms by 0.2%).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def build_request(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    head = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, (await reader.readexactly(length)) if length else b""


Record = Callable[[float, int, bytes], None]  # (when it arrived, status, body) of every answer


class Window:
    """What the measured window saw: every answer that arrived in it, whenever it was asked (both protocols)."""

    def __init__(self, warmup: float, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter() + warmup
        self.stop = self.start + seconds
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0

    def answered(self, t0: float, t1: float, status: int, ok: bool) -> None:
        if self.start <= t1 <= self.stop:
            self.latencies.append(t1 - t0)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.errors += not ok

    def result(self) -> LoadResult:
        return LoadResult(len(self.latencies), self.errors, self.seconds, self.latencies, self.statuses)


async def _run(
    url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float, warmup: float,
    record: Record | None = None,
) -> LoadResult:  # fmt: skip
    host, port, request = build_request(url, body, headers)
    window = Window(warmup, seconds)

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= window.stop:
                    return
                writer.write(request)
                try:
                    status, answer = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    window.errors += 1  # counted whenever it happens
                    if record is not None:
                        record(time.perf_counter(), 0, b"")  # a connection lost mid-request
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                t1 = time.perf_counter()
                if record is not None:
                    record(t1, status, answer)
                window.answered(t0, t1, status, status == 200)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return window.result()


def run_load(
    url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float, warmup: float = 2.0,
    record: Record | None = None,
) -> LoadResult:  # fmt: skip
    """Drive `url` with `clients` concurrent connections for `seconds` (after `warmup`), POSTing `body`; `record`
    sees every answer as it arrives."""
    try:
        import uvloop

        return uvloop.run(_run(url, body, headers, clients, seconds, warmup, record))
    except ImportError:
        return asyncio.run(_run(url, body, headers, clients, seconds, warmup, record))


async def _run_grpc(target: str, method: str, body: bytes, clients: int, seconds: float, warmup: float,
                    per_channel: int) -> LoadResult:  # fmt: skip
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1),  # a connection per channel: the kernel spreads them
               ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]  # fmt: skip
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, -(-clients // per_channel)))]
    window = Window(warmup, seconds)

    async def client(i: int) -> None:
        call = channels[i % len(channels)].unary_unary(method)  # bytes in, bytes out: built once, nothing parsed
        while True:
            t0 = time.perf_counter()
            if t0 >= window.stop:
                return
            try:
                await call(body, timeout=60)
                code = 0
            except grpc.aio.AioRpcError as e:
                code = e.code().value[0]
            window.answered(t0, time.perf_counter(), code, code == 0)

    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        for channel in channels:
            await channel.close()
    return window.result()


def run_grpc_load(target: str, method: str, body: bytes, clients: int, seconds: float, warmup: float = 2.0,
                  per_channel: int = 8) -> LoadResult:  # fmt: skip
    """The gRPC twin of run_load: `clients` concurrent calls of `method` (a serialized request, sent as it is) at
    HOST:PORT over one HTTP/2 connection per `per_channel` clients; statuses are gRPC codes (0: OK)."""
    import uvloop

    return uvloop.run(_run_grpc(target, method, body, clients, seconds, warmup, per_channel))
