"""A load or unload request, from an API server to the model controller in the main process: over a ZeroMQ REQ socket
in the server's run folder, answered once the versions it asked about have settled (loaded on every worker, or
drained and unloaded) or it failed."""

from __future__ import annotations

import json
import os
from typing import Any

import zmq

from modelship.serving.errors import RequestError

ASK_TIMEOUT = 300.0  # how long a load or unload request waits for its versions to settle


def address(run_dir: str) -> str:
    return f"ipc://{os.path.join(run_dir, 'ctl')}"


def ask(run_dir: str, request: dict[str, Any]) -> None:
    """In an API server: a load or unload request to the controller, returned once it is done; RequestError with
    the controller's status and message when it failed."""
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
