"""`modelship serve` and `modelship predict`: flags, config, and the client's output."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from modelship.cli.args import config_from, default, pair
from modelship.devices import DEVICES
from modelship.manifest import BACKENDS
from modelship.options import (
    CLIENT_TIMEOUT,
    CLIENT_URL,
    ENGINES,
    PREDICT_FORMATS,
    RAY_FORMATS,
    EvaluateConfig,
    PredictConfig,
)
from modelship.serving.config import HOSTS, LOG_LEVELS, MODEL_CONTROL, ROLLOUTS, VERSION_POLICIES, ServeConfig  # light


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Flags of `serve`; defaults come from ServeConfig."""

    def d(name: str) -> Any:
        return default(ServeConfig, name)

    p.add_argument(
        "bundle", type=Path, metavar="PATH", help="a bundle, or a model repository REPO/<name>/<version>/ of bundles"
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default=d("backend"), help="which artifact to run (default %(default)s)"
    )
    p.add_argument(
        "--model-control", choices=MODEL_CONTROL, default=d("model_control"),
        help="none: load every model at start, change nothing; poll: also rescan the repository every "
        "--poll-interval and load/unload what appears/goes; explicit: --load-model at start, then the repository "
        "API's load and unload (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--load-model", dest="load_models", action="append", default=[], metavar="NAME",
        help="with --model-control explicit: a model to load at start (repeatable; * for every one)",
    )  # fmt: skip
    p.add_argument(
        "--poll-interval", type=float, default=d("poll_interval"),
        help="seconds between looks at the repository (poll; explicit: for the index) (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--version-policy", choices=VERSION_POLICIES, default=d("version_policy"),
        help="latest: serve a model's newest version that loaded; all: every version, each addressable "
        "(default %(default)s)",
    )  # fmt: skip
    p.add_argument("--device", choices=DEVICES, default=d("device"), help="(default %(default)s)")
    p.add_argument("--host", default=d("host"), help=f"{', '.join(HOSTS)} (default %(default)s)")
    p.add_argument("--port", type=int, default=d("port"), help="(default %(default)s)")
    p.add_argument(
        "--grpc-port", type=int, default=d("grpc_port"), metavar="P",
        help="also serve KServe v2 over gRPC on this port, e.g. 8001 (default: HTTP only)",
    )  # fmt: skip
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
        help="seconds a worker waits for more requests to fill a batch (default %(default)s: it takes what is waiting)",
    )
    p.add_argument(
        "--workers-per-device",
        type=int,
        default=d("workers_per_device"),
        help="inference processes per CPU/GPU (default %(default)s)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the model inside each API server instead of in worker processes: faster for small models, but a "
        "crash in the runtime loses the requests its API server holds; CPU only",
    )
    p.add_argument(
        "--api-servers",
        type=int,
        default=d("api_servers"),
        help="HTTP server processes (default: one per inference worker; with --in-process, each runs the model)",
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
        "--hang-timeout",
        type=float,
        default=d("hang_timeout"),
        help="seconds a worker may hold a batch (and 10x its recent batches) before it is killed, replaced, and its "
        "requests run elsewhere (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d("header_timeout"),
        help="seconds a client has to send a request's headers before it gets 408 (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=d("body_timeout"),
        help="seconds a client has to send a request's body after its headers (default %(default)s)",
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
    add_monitoring_args(p.add_argument_group("watching the model: live drift and the payload log"))
    add_rollout_args(p.add_argument_group("rolling out a new version: shadow or canary, promoted or rolled back"))


def add_rollout_args(g: Any) -> None:
    """serve's flags for rollouts (with --model-control poll or explicit, --version-policy latest)."""

    def d(name: str) -> Any:
        return default(ServeConfig, name)

    g.add_argument("--rollout", choices=ROLLOUTS, default=d("rollout"),
                   help="none: a new version takes every request once loaded; shadow: it runs copies of requests, its "
                   "answers only compared; canary: it answers a share of them; then it is promoted or rolled back "
                   "on the evidence (default %(default)s)")  # fmt: skip
    g.add_argument("--shadow-sample", type=float, default=d("shadow_sample"), metavar="F",
                   help="shadow: the share of requests copied to the new version (default %(default)s)")  # fmt: skip
    g.add_argument("--canary-percent", type=float, default=d("canary_percent"), metavar="P",
                   help="canary: the percent of requests the new version answers (default %(default)s)")  # fmt: skip
    g.add_argument("--rollout-requests", type=int, default=d("rollout_requests"), metavar="N",
                   help="requests both versions ran that end a rollout (default %(default)s)")  # fmt: skip
    g.add_argument("--min-agreement", type=float, default=d("min_agreement"), metavar="A",
                   help="the share of answers whose top-1 class the new version must agree on with the serving one "
                   "(default %(default)s)")  # fmt: skip


def add_monitoring_args(g: Any) -> None:
    """serve's flags for live drift against the bundle's reference, and for the payload log."""

    def d(name: str) -> Any:
        return default(ServeConfig, name)

    g.add_argument(
        "--drift-window",
        type=int,
        default=d("drift_window"),
        metavar="N",
        help="answers of each model version live drift is measured over; 0: off (default %(default)s)",
    )
    for name, what in (("psi", "PSI of the predicted classes"), ("low-confidence", "share of answers under the "
                       "reference's 5th-percentile confidence"), ("shift", "an input channel's mean shift, in the "
                       "reference's sds of image means")):  # fmt: skip
        warn, drift = d(f"drift_{name.replace('-', '_')}")
        g.add_argument(f"--drift-{name}", type=pair, default=(warn, drift), metavar="WARN,DRIFT",
                       help=f"{what}: the status turns warn, then drift (default {warn:g},{drift:g})")  # fmt: skip
    g.add_argument("--log-payloads", default=d("log_payloads"), metavar="DEST",
                   help="record sampled requests: a folder (rotated JSON lines) or an http(s) URL (CloudEvents, as "
                   "KServe's logger sends them)")  # fmt: skip
    g.add_argument("--log-sample", type=float, default=d("log_sample"), metavar="F",
                   help="the share of requests recorded (default %(default)s)")  # fmt: skip
    g.add_argument("--log-inputs", action="store_true", help="record each input tensor too (base64 float32)")
    g.add_argument("--log-max-mb", type=float, default=d("log_max_mb"), metavar="MB",
                   help="a log file is rotated past this (default %(default)s)")  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from modelship.serving.server import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("MODELSHIP_API_KEY")
    serve(config_from(ServeConfig, args, api_key=api_key, cors_origins=tuple(args.cors_origins),
                      load_models=tuple(args.load_models)))  # fmt: skip
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    def d(name: str) -> Any:
        return default(PredictConfig, name)

    p.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE",
        help="image files, and folders of them (recursively); with --engine ray also text files listing paths or URIs, "
        "and s3:// gs:// file:// URIs of files or prefixes",
    )
    p.add_argument(
        "--url",
        help=f"a server: its /predict, or with --bundle its v2 API over HTTP (e.g. {CLIENT_URL}) or gRPC "
        "(grpc://HOST:PORT)",
    )
    p.add_argument(
        "--bundle", type=Path, metavar="BUNDLE_DIR", help="preprocess with this bundle; alone: run it offline"
    )
    p.add_argument(
        "--backend",
        default=d("backend"),
        help=f"offline: the artifact to run, {', '.join(BACKENDS)} (default %(default)s)",
    )
    p.add_argument("--top-k", type=int, help="how many classes to list (default: up to 5)")
    p.add_argument(
        "--batch-size", type=int, default=d("batch_size"), help="images per batch with --bundle (default %(default)s)"
    )
    p.add_argument(
        "--format",
        choices=(*PREDICT_FORMATS, *(f for f in RAY_FORMATS if f not in PREDICT_FORMATS)),
        help="tsv for people, csv, or jsonl (default tsv); --engine ray: parquet (default), csv or jsonl",
    )
    p.add_argument(
        "--output",
        type=Path,
        metavar="OUT",
        help="write there (whole, once done) instead of stdout; --engine ray: a folder, needed",
    )
    p.add_argument("--device", choices=DEVICES, default=d("device"), help="offline (default %(default)s)")
    p.add_argument("--api-key", help="default: $MODELSHIP_API_KEY")
    p.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT, help="seconds per request (default %(default)s)")
    g = p.add_argument_group("scoring at scale on a Ray cluster (pip install 'modelship[ray]')")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default=d("engine"),
        help="local: this process; ray: Ray Data (default %(default)s)",
    )
    g.add_argument(
        "--address",
        help="the cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local one for the run, on loopback)",
    )
    g.add_argument("--actors", type=int, help="model replicas (default: as many as leave one CPU to read files)")
    g.add_argument("--logits", action="store_true", help="add each image's logits to its row")
    g.add_argument("--force", action="store_true", help="replace an existing --output folder")


def cmd_predict(args: argparse.Namespace) -> int:
    from modelship.predict import predict

    api_key = args.api_key or os.environ.get("MODELSHIP_API_KEY")
    cfg = config_from(PredictConfig, args, paths=tuple(args.paths), api_key=api_key)
    if cfg.engine == "ray":
        from modelship.scale import score

        return score(cfg)
    n = predict(cfg, sys.stdout)
    if args.output is not None:
        print(f"{n} prediction(s) written to {args.output}", file=sys.stderr)
    return 0


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    def d(name: str) -> Any:
        return default(EvaluateConfig, name)

    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="PATH",
        help="a labelled ImageFolder (PATH/val or PATH/test when there is one)",
    )
    p.add_argument(
        "--backend",
        dest="backends",
        action="append",
        metavar="KEY",
        help=f"an artifact to evaluate, repeatable: {', '.join(BACKENDS)} (default onnx)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=d("out"),
        metavar="DIR",
        help="where evaluation.json, confusion_matrix.png and report.html go (default %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=d("batch_size"), help="(default %(default)s)")
    p.add_argument("--device", choices=DEVICES, default=d("device"), help="(default %(default)s)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from modelship.evaluate import evaluate

    backends = tuple(args.backends) if args.backends else default(EvaluateConfig, "backends")
    result = evaluate(config_from(EvaluateConfig, args, backends=backends))
    print(f"{'backend':<12} {'images':>7} {'accuracy':>9} {'delta':>8} {'ece':>7} {'images/s':>9}")
    for r in result.results:
        delta = f"{r['accuracy_delta']:+.4f}" if "accuracy_delta" in r else ""
        speed = f"{r['images_per_s']:>9.1f}"
        print(f"{r['backend']:<12} {r['n']:>7} {r['accuracy']:>9.4f} {delta:>8} {r['ece']:>7.4f} {speed}")
    print(f"report: {result.out / 'report.html'}", file=sys.stderr)
    return 0
