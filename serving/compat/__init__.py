"""Every use of LitServe, in one package, with the reason for each (ARCHITECTURE.md has them as a table): nothing else
of modelship imports litserve.

modelship uses LitServe's public API (LitAPI, LitServer, LitSpec endpoints) for what it offers — the FastAPI app,
the uvicorn API server processes, the inference worker processes and their replacement when one dies — and reaches
past it only where listed here. These names are private and move between patch releases, so modelship pins one
release (`check.SUPPORTED`), and at import checks every overridden name against the parameters its override
expects and the LitServe function that must still call it (`check.OVERRIDES`), and that every attribute it reads
is still set (`check.ATTRIBUTES`); `check_version` refuses to start on a mismatch.

1. Requests and answers travel over modelship's own ZeroMQ transport (`modelship.serving.dispatch.transport`, and the
   broker in `modelship.serving.dispatch.broker`), not over LitServe's Manager request queue and response transport: the
   Manager round trips took a third of the API servers' and half of the workers' time, and a worker killed while
   reading could strand a request. `Server` starts the broker in `_init_manager`, gives LitServe an idle response
   transport, and registers each worker process LitServe starts (`launch_inference_worker`, and the monitor's
   `launch_single_inference_worker`) with the broker, which sees its death at once. `ZMQLoop` is the worker loop.
2. `verify_worker_status` is replaced: LitServe waits for a ready worker before it starts HTTP; modelship starts
   HTTP at once so `/health` answers 503 while the workers warm up, and watches for a worker that fails to load.
3. LitServe's own `/` ("litserve running"), `/health` and info routes are removed from the app: modelship answers
   them itself (readiness from the broker's heartbeat, with HEAD). Its GZip middleware is removed (answers here are
   a few hundred bytes, and the layer costs every request), and the spec's routes are registered again without
   LitServe's per-route auth dependency, a synchronous function FastAPI runs in a thread pool on every request:
   modelship checks the API key in its own middleware.
4. `_start_server` gives each API server process its own listening socket with SO_REUSEPORT, so the kernel spreads
   new connections over them: with LitServe's one shared socket, a burst of connections often all went to one
   process while the other idled (BENCHMARKS.md, serving). It serves the app wrapped in modelship's front door
   (`front`: the guard, and CORS when asked) rather than passing those to LitServe as middlewares, which FastAPI
   would put inside its own layers, on uvicorn with read timeouts (`modelship.serving.http_api.connections`);
   and a dead API server is replaced. Each API server follows the main process through the fork hook `serve` registers
   (`modelship.serving.lifeline`).
5. `_perform_graceful_shutdown` stops every API server at once (LitServe stops them one after another, so the later
   ones kept connections alive while the first drained), and no worker is replaced once shutdown has begun (a flag
   `launch_single_inference_worker` reads): LitServe's monitor would otherwise restart the workers shutdown just
   stopped, and those would fail on the Manager being shut down, with a traceback.
6. With --in-process (`modelship.serving.dispatch.in_process`) LitServe starts no inference worker
   (`_inference_workers_config_for_api` is empty); each API server reports its own model under
   `in_process_key(i)` in `workers_setup_status`, so the setup watch reads it as it reads workers'.
7. A worker whose model did not load has logged why in one line; LitServe's `inference_worker` then logs "Error
   setting up worker N." with the whole traceback. `quiet_setup_error` drops that traceback (kept under -v).
"""

from __future__ import annotations

from litserve.specs.base import LitSpec

from modelship.serving.compat.check import MISMATCH, SUPPORTED, SUPPORTED_TEXT, check_version
from modelship.serving.compat.server import APIServer, Server, in_process_key
from modelship.serving.compat.worker import WorkerAPI, ZMQLoop, quiet_setup_error

__all__ = [
    "MISMATCH",
    "SUPPORTED",
    "SUPPORTED_TEXT",
    "APIServer",
    "LitSpec",
    "Server",
    "WorkerAPI",
    "ZMQLoop",
    "check_version",
    "in_process_key",
    "quiet_setup_error",
]
