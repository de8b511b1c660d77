"""The LitServe release modelship was tested with, and the import-time check of every private name it overrides or
reads: a renamed hook or attribute refuses the server at start, in one line, rather than failing inside a request."""

from __future__ import annotations

import inspect
import re
from typing import Any

import litserve as ls
from litserve.loops import loops
from litserve.loops.base import LitLoop
from litserve.server import _Server
from litserve.specs.base import LitSpec

from modelship.errors import ConfigError

SUPPORTED = ("0.2.19",)  # the exact releases the test suite ran on: hooks move between patch releases
SUPPORTED_TEXT = "litserve==0.2.19"

# Every LitServe name modelship overrides or calls, with the parameters the override expects; and for each hook,
# the LitServe function that must still call it (a renamed hook would silently stop being called).
OVERRIDES: tuple[tuple[Any, str, tuple[str, ...], Any], ...] = (
    (ls.LitServer, "_init_manager", ("self", "num_api_servers"), ls.LitServer.run),
    (ls.LitServer, "_inference_workers_config_for_api", ("self", "api_path"), ls.LitServer.launch_inference_worker),
    (ls.LitServer, "launch_inference_worker", ("self", "lit_api"), ls.LitServer.run),
    (ls.LitServer, "launch_single_inference_worker", ("self", "lit_api", "worker_id"),
     ls.LitServer._start_worker_monitoring),
    (ls.LitServer, "_perform_graceful_shutdown", ("self", "manager", "uvicorn_workers", "shutdown_reason"),
     ls.LitServer.run),
    (ls.LitServer, "_start_server",
     ("self", "port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type", "kwargs"),
     ls.LitServer.run),
    (ls.LitServer, "verify_worker_status", ("self",), ls.LitServer.run),
    (ls.LitServer, "_prepare_app_run", ("self", "app"), None),
    (_Server, "run", ("self", "worker_id", "sockets"), None),
    (LitLoop, "__call__", ("self", "lit_api", "device", "worker_id", "request_queue", "transport",
                           "workers_setup_status", "callback_runner"), None),
)  # fmt: skip


# Every LitServe attribute modelship reads or sets on LitServe's objects (instance attributes are found where the
# class's own code assigns them): a rename would otherwise surface as an AttributeError inside a request.
ATTRIBUTES: tuple[tuple[Any, tuple[str, ...]], ...] = (
    (ls.LitServer, ("app", "workers_setup_status", "litapi_connector", "inference_workers", "uvicorn_graceful_timeout",
                    "_transport", "_shutdown_event")),
    (ls.LitAPI, ("spec", "api_path", "max_batch_size", "batch_timeout", "request_timeout")),
    (LitSpec, ("response_queue_id",)),
)  # fmt: skip
SETUP_ERROR = "Error setting up worker"  # what LitServe's inference_worker logs, with a traceback, when setup raises


def check_version(version: str | None = None) -> None:
    """ConfigError naming the installed and the supported LitServe when they do not fit, or the first overridden
    name that does not (checked when this module was imported)."""
    version = version or ls.__version__
    if version.split("+")[0] not in SUPPORTED:
        raise ConfigError(
            f"litserve {version} is installed, but modelship serve is tested with {SUPPORTED_TEXT} (it relies on "
            f"LitServe internals that change between releases); pip install '{SUPPORTED_TEXT}'"
        )
    if MISMATCH is not None:
        raise ConfigError(MISMATCH)


def mismatch(overrides: tuple[tuple[Any, str, tuple[str, ...], Any], ...]) -> str | None:
    """The first LitServe name that is missing, takes other parameters than its override expects, or is no longer
    called where the override relies on it; None when all fit."""
    for owner, name, params, caller in overrides:
        where = f"{owner.__module__}.{owner.__qualname__}.{name}"
        fn = getattr(owner, name, None)
        if fn is None:
            found = "is missing"
        elif tuple(inspect.signature(fn).parameters) != params:
            found = f"takes ({', '.join(inspect.signature(fn).parameters)}), expected ({', '.join(params)})"
        elif caller is not None and name not in inspect.getsource(caller):
            found = f"is no longer called by {caller.__qualname__}"
        else:
            continue
        return f"litserve {ls.__version__}: {where} {found}; modelship serve overrides it and needs {SUPPORTED_TEXT}"
    return None


def missing_attribute(attributes: tuple[tuple[Any, tuple[str, ...]], ...]) -> str | None:
    """The first attribute LitServe no longer has (as a class attribute, or assigned in the class's code); None when
    all are there."""
    for owner, names in attributes:
        source = "".join(inspect.getsource(cls) for cls in owner.__mro__ if cls.__module__.startswith("litserve"))
        for name in names:
            if not hasattr(owner, name) and not re.search(rf"\bself\.{name}\s*(:[^=]*)?=[^=]", source):
                where = f"{owner.__module__}.{owner.__qualname__}"
                needs = f"modelship serve reads it and needs {SUPPORTED_TEXT}"
                return f"litserve {ls.__version__}: {where} no longer sets {name}; {needs}"
    return None


def setup_error_mismatch() -> str | None:
    if SETUP_ERROR in inspect.getsource(loops.inference_worker):
        return None
    return (
        f"litserve {ls.__version__}: inference_worker no longer logs {SETUP_ERROR!r}; modelship needs {SUPPORTED_TEXT}"
    )


MISMATCH = mismatch(OVERRIDES) or missing_attribute(ATTRIBUTES) or setup_error_mismatch()  # at import
