"""Every `{"error": ...}` body the HTTP API sends, and the shape of an answer: the one mapping of an exception to what
the client gets (a RequestError is its status with its message; anything else is logged and answered 500), for the
routes the Guard answers itself, the routes FastAPI serves, FastAPI's own 404 and 405, and the Guard's own 401 and
413."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from fastapi import Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from modelship.serving.errors import RequestError

log = logging.getLogger(__name__)

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
Send = Callable[[Any], Awaitable[None]]
CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer; never sent, only counted
JSON_HEADERS = [(b"content-type", b"application/json")]
INTERNAL = "internal server error; see the server log"


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def error_answer(e: Exception) -> Answer:
    """What the client gets for an exception: a RequestError is its 4xx (or 5xx) with {"error": message}; anything
    else is logged and answered 500."""
    if isinstance(e, RequestError):
        return e.status, JSON_HEADERS, error_body(e.message)
    log.error("unhandled error answering a request", exc_info=e)
    return 500, JSON_HEADERS, error_body(INTERNAL)


def json_answer(doc: Any, status: int = 200) -> Answer:
    return status, JSON_HEADERS, pydantic_core.to_json(doc)


def not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> str:
    return f"{method} is not allowed on {path}; it takes {', '.join(allowed)}"


def too_large(size: int, limit: int, why: str) -> str:
    return f"the request body ({size} bytes or more) is over the {limit} byte {why}"


async def send_error(
    send: Send, status: int, message: str, close: bool = False, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete {"error": message} response, sent straight from the Guard."""
    body = error_body(message)
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(extra or [])]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw(status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> Response:
    """An Answer as a Starlette response (the routes FastAPI serves)."""
    response = Response(content, status_code=status)
    response.raw_headers = [(b"content-length", str(len(content)).encode()), *headers]
    return response


def handled(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """A route FastAPI serves: client mistakes become {"error": ...} with their 4xx; a client gone mid-request is
    499 (counted, not logged as an error); anything else is logged and answered 500."""

    @functools.wraps(fn)  # FastAPI reads the endpoint's signature through __wrapped__
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await fn(*args, **kwargs)
        except ClientDisconnect:
            log.debug("%s: the client disconnected before its request arrived", fn.__name__)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return raw(*error_answer(e))

    return wrapper


def install_errors(app: Any) -> None:
    """FastAPI's own answers (an unknown route, a method a route does not take) in the API's {"error"} shape."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no route {request.url.path}; GET / lists the routes, /docs describes them"
        elif exc.status_code == 405:
            allowed = tuple((exc.headers or {}).get("Allow", "other methods").split(", "))
            message = not_allowed(request.method, request.url.path, allowed)
        else:
            message = str(exc.detail)
        extra = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        return raw(exc.status_code, [*JSON_HEADERS, *extra], error_body(message))

    app.add_exception_handler(StarletteHTTPException, http_error)
