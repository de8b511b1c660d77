"""A request from an API server to the model controller in the main process, both ends: over a ZeroMQ REQ socket in
the server's run folder. A load or unload is answered once the versions it asked about have settled (loaded on every
worker, or drained and unloaded) or it failed; a rollout's promote or abort at once, with its outcome."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from modelship.serving.control.table import READY, UNAVAILABLE, Table
from modelship.serving.errors import RequestError

ASK_TIMEOUT = 300.0  # how long a load or unload request waits for its versions to settle


def address(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'ctl')}"


def ask(run_dir: str, request: dict[str, Any]) -> str:
    """In an API server: a request to the controller (load, unload, promote, abort), returned once it is done with
    the controller's message; RequestError with its status and message when it failed."""
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address(run_dir))
    try:
        sock.send(json.dumps(request).encode())
        if not sock.poll(int(ASK_TIMEOUT * 1000) + 5000):
            raise RequestError("the model controller did not answer; see the server log", 503)
        status, message = json.loads(sock.recv())
    finally:
        sock.close()
    if status != 200:
        raise RequestError(message, int(status))
    return str(message)


def change(run_dir: str, model_control: str, op: str, name: str, parameters: list[str]) -> None:
    """A load or unload request (with these parameter names) from an API server, returned once done."""
    if model_control != "explicit":
        raise RequestError(
            f"the model repository is not under explicit control (--model-control {model_control}); start the "
            "server with --model-control explicit to load and unload models by request",
            400,
        )
    if any(k == "config" or k.startswith("file:") for k in parameters):
        raise RequestError(f"{op} takes no model configuration or files here; send no parameters")
    ask(run_dir, {"op": op, "name": name})


# ---------------------------------------------------------------------------------------------- the controller's end


@dataclass
class Waiting:
    """A load or unload request, answered when its versions have settled."""

    who: list[bytes]  # the ROUTER envelope
    op: str
    name: str
    keys: list[str]
    deadline: float = field(default_factory=lambda: time.monotonic() + ASK_TIMEOUT)


def answer(sock: zmq.Socket, waiting: list[Waiting], table: Table) -> list[Waiting]:
    """Reply to the load and unload requests whose versions have settled (or waited too long); those still waiting."""
    now, still = time.monotonic(), []
    for w in waiting:
        states = {k: table.versions[k] for k in w.keys if k in table.versions}
        failed = [v for v in states.values() if v.state == UNAVAILABLE]
        loaded = len(states) == len(w.keys) and all(v.state == READY for v in states.values())
        if w.op == "load" and failed:
            reply(sock, w.who, 400, f"failed to load {w.name!r}: {failed[0].reason}")
        elif loaded if w.op == "load" else not states:
            reply(sock, w.who, 200)
        elif now > w.deadline:
            reply(sock, w.who, 504, f"{w.op} of {w.name!r} did not finish in {ASK_TIMEOUT:g}s")
        else:
            still.append(w)
    return still


def reply(sock: zmq.Socket, who: list[bytes], status: int, message: str = "") -> None:
    """Answer a request: its HTTP status, and the outcome or what failed (the API server raises it)."""
    sock.send_multipart([*who, json.dumps([status, message]).encode()])
