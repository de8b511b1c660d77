"""The ceiling: a bare ASGI app under uvicorn that reads each request body (and parses it, when it is JSON) and
answers a fixed small JSON. Nothing a server could do per request costs less.

    python benchmarks/bare_server.py --port 8002 [--workers 2] [--parser pydantic|json]

`--parser pydantic` parses with pydantic-core, as modelship does; `--parser json` with the standard library's
json.loads, as a plain app would.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import pydantic_core
import uvicorn

PARSE = json.loads if os.environ.get("BARE_PARSER") == "json" else pydantic_core.from_json
ANSWER = b'{"label":"x","index":0,"score":1.0}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    if dict(scope["headers"]).get(b"content-type") == b"application/json":
        PARSE(b"".join(chunks))
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2, help="processes, as many as modelship's API servers")
    parser.add_argument("--parser", choices=("pydantic", "json"), default="pydantic")
    args = parser.parse_args()
    os.environ["BARE_PARSER"] = args.parser  # the uvicorn worker processes import the app anew
    uvicorn.run("benchmarks.bare_server:app", host="127.0.0.1", port=args.port, workers=args.workers,
                log_level="warning", access_log=False)  # fmt: skip
