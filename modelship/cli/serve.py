"""`modelship serve` and `modelship predict`: flags, config, and the client's output."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from modelship.cli.args import config_from, default
from modelship.devices import DEVICES
from modelship.serving.config import (  # light: standard library only
    BACKENDS,
    CLIENT_TIMEOUT,
    CLIENT_URL,
    HOSTS,
    LOG_LEVELS,
    ServeConfig,
)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags of `serve`; defaults come from ServeConfig."""

    def d(name: str) -> Any:
        return default(ServeConfig, name)

    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument(
        "--backend", choices=BACKENDS, default=d("backend"), help="which artifact to run (default %(default)s)"
    )
    p.add_argument("--device", choices=DEVICES, default=d("device"), help="(default %(default)s)")
    p.add_argument("--host", default=d("host"), help=f"{', '.join(HOSTS)} (default %(default)s)")
    p.add_argument("--port", type=int, default=d("port"), help="(default %(default)s)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=d("max_batch_size"),
        help="requests per dynamic batch (default %(default)s)",
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=d("batch_timeout"),
        help="seconds to wait for a batch to fill (default %(default)s)",
    )
    p.add_argument(
        "--workers-per-device",
        type=int,
        default=d("workers_per_device"),
        help="inference processes per CPU/GPU (default %(default)s)",
    )
    p.add_argument(
        "--api-servers",
        type=int,
        default=d("api_servers"),
        help="HTTP server processes (default: one per inference worker)",
    )
    p.add_argument(
        "--threads", type=int, default=d("threads"), help="compute threads per worker (default: CPU cores / workers)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=d("timeout"),
        help="seconds before a request is answered 504 (default %(default)s)",
    )
    p.add_argument(
        "--max-payload-mb",
        type=float,
        default=d("max_payload_mb"),
        help="larger bodies are answered 413 (default %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=d("api_key"),
        help="require this key on every route but health and docs (default: $MODELSHIP_API_KEY)",
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=list(d("cors_origins")),
        metavar="ORIGIN",
        help="let browser apps on this origin call the API (repeatable; * for any; default none)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default=d("log_level"), help="(default %(default)s)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def cmd_serve(args: argparse.Namespace) -> int:
    from modelship.serving.server import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("MODELSHIP_API_KEY")
    serve(config_from(ServeConfig, args, api_key=api_key, cors_origins=tuple(args.cors_origins)))
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--url", default=CLIENT_URL, help="server address (default %(default)s)")
    p.add_argument("--top-k", type=int, help="how many classes to list (default: the server's, up to 5)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer per image")
    p.add_argument("--api-key", help="default: $MODELSHIP_API_KEY")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT, help="seconds per request (default %(default)s)")


def cmd_predict(args: argparse.Namespace) -> int:
    from modelship.serving.client import Client

    client = Client(args.url, args.api_key or os.environ.get("MODELSHIP_API_KEY"), args.timeout)
    for image in args.images:
        answer = client.predict_image(image, args.top_k)
        if args.json:
            print(json.dumps({"image": str(image), **answer}))
        else:
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in answer["top_k"][1:])
            print(f"{image}\t{answer['label']}\t{answer['score']:.4f}" + (f"\t({others})" if others else ""))
    return 0
