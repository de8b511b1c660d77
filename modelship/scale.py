"""`modelship predict --engine ray`: score millions of images on a Ray cluster with the bundle's own preprocessing.

The driver lists the sources (folders by the rules local `predict` reads them with, listings line by line, and
object-storage prefixes through pyarrow's filesystems) into rows of (path as shown, where to read it); Ray Data
streams them through a pool of actors (`map_batches`), each of which holds the bundle's artifact, reads its files,
decodes and preprocesses them with `modelship.preprocess`, runs them in batches and turns the logits into rows with
`modelship.scores`: a row equals local predict's. A file that cannot be read or decoded becomes an error row, never
a failed task. The driver takes the rows as they come (`iter_batches`) and writes them to a folder beside OUT,
renamed to OUT once every row is in: a failed run leaves nothing half-written.

Only the paths go through the driver and the object store; images are read by the actors, a batch at a time, so
memory stays flat however many files there are. Actors and the driver bind to loopback for a cluster started for
the run (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping 127.0.0.1 for the machine's address).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from modelship.errors import BundleError, DataError, ModelshipError
from modelship.imagefolder import IMG_EXTENSIONS, MAX_PIXELS, images_under, visible
from modelship.manifest import check_bundle, require_artifact
from modelship.options import PredictConfig
from modelship.predict import format_row
from modelship.scores import default_top_k

LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node address (ray/_private/services.py)
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PART_ROWS = 100_000  # rows per Parquet part file
ERRORS = "_errors.csv"  # the files that could not be scored: "_" keeps Parquet readers from taking it for a part
log = logging.getLogger(__name__)


class RunFailed(ModelshipError):
    """Some files could not be scored: the rest were (exit 1)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------------ the sources


def sources(paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path as shown in the rows, where to read it) for every file of every source; DataError naming a source that
    does not exist or holds no images."""
    found: list[tuple[str, str]] = []
    for p in paths:
        if URI.match(p):
            found += uri_files(p)
        elif Path(p).is_dir():
            files = images_under(Path(p))
            if not files:
                raise DataError(f"folder {p} has no images")
            found += [(f, os.path.abspath(f)) for f in files]
        elif Path(p).is_file():
            found += [(p, os.path.abspath(p))] if Path(p).suffix.lower() in IMG_EXTENSIONS else listed(Path(p))
        else:
            raise DataError(f"source {p} does not exist; expected an image, a folder, a listing or a URI")
    if not found:
        raise DataError(f"no images in {', '.join(paths)}")
    return found


def listed(listing: Path) -> list[tuple[str, str]]:
    """A text file with a path or URI a line (blank lines and # comments skipped; relative paths are relative to the
    listing's folder)."""
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read listing {listing}: {e}; expected a text file with a path or URI a line") from None
    out = []
    for line in (raw.strip() for raw in lines):
        if line and not line.startswith("#"):
            out.append((line, line if URI.match(line) else os.path.abspath(listing.parent / line)))
    if not out:
        raise DataError(f"listing {listing} names no files")
    return out


def uri_files(uri: str) -> list[tuple[str, str]]:
    """A file URI itself, or the visible images under a prefix (recursively, sorted), through pyarrow's filesystems
    and their standard credential chains."""
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [(uri, uri)]
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri} does not exist")
        listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise DataError(f"cannot list {uri}: {e}") from None
    prefix = uri[: uri.index("://") + 3]
    found = sorted(
        prefix + f.path
        for f in listing
        if f.type == pafs.FileType.File
        and Path(f.path).suffix.lower() in IMG_EXTENSIONS
        and visible(Path(f.path), Path(root))
    )
    if not found:
        raise DataError(f"{uri} holds no images")
    return [(f, f) for f in found]


# ------------------------------------------------------------------------------------------------------- the actors


class Scorer:
    """A Ray Data actor: the bundle's artifact, loaded once from the bytes the driver checked, and `__call__` on a
    batch of rows {path, location} -> {row (JSON of local predict's row), error}."""

    def __init__(self, manifest: dict[str, Any], backend: str, artifact: list[Any], device: str, threads: int,
                 top_k: int, logits: bool) -> None:  # fmt: skip
        import hashlib

        import ray

        from modelship.backends import load_backend
        from modelship.preprocess import Preprocess

        data = ray.get(artifact[0])
        entry = manifest["artifacts"][backend]
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"artifact {entry['path']} arrived with another sha256 than the bundle's manifest")
        with tempfile.TemporaryDirectory() as tmp:  # the runtimes load from a file, then hold the model in memory
            path = Path(tmp) / Path(entry["path"]).name
            path.write_bytes(data)
            self.run = load_backend(backend, path, device, threads).run
        self.pre = Preprocess.from_dict(manifest["preprocess"])
        self.classes, self.chunk = tuple(manifest["classes"]), int(manifest["max_batch"])
        self.top_k, self.logits = top_k, logits
        self.filesystems: dict[tuple[str, str], Any] = {}

    def read(self, location: str) -> bytes:
        if not URI.match(location):
            return Path(location).read_bytes()
        from pyarrow import fs as pafs

        parts = urlsplit(location)
        key = (parts.scheme, parts.netloc)
        if key not in self.filesystems:
            self.filesystems[key] = pafs.FileSystem.from_uri(location)[0]
        path = parts.path if parts.scheme == "file" else parts.netloc + parts.path
        with self.filesystems[key].open_input_stream(path) as f:
            return bytes(f.read())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from modelship.preprocess import decode_image, preprocess_image
        from modelship.scores import prediction

        paths = [str(p) for p in batch["path"]]
        errors = [""] * len(paths)
        arrays, good = [], []
        for i, location in enumerate(batch["location"]):
            try:
                image = decode_image(self.read(str(location)), f"image {paths[i]}", MAX_PIXELS)
                arrays.append(preprocess_image(image, self.pre))
                good.append(i)
            except (DataError, OSError, ValueError) as e:
                errors[i] = str(e) if isinstance(e, DataError) else f"cannot read image {paths[i]}: {e}"
        rows = [""] * len(paths)
        if arrays:
            x = np.stack(arrays)
            logits = np.concatenate([self.run(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])
            for i, row in zip(good, logits, strict=True):
                out = {"path": paths[i], **prediction(row, self.classes, self.top_k)}
                if self.logits:
                    out["logits"] = [float(v) for v in row]
                rows[i] = json.dumps(out)
        return {"row": np.asarray(rows, dtype=object), "error": np.asarray(errors, dtype=object),
                "path": np.asarray(paths, dtype=object)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- the cluster


def is_loopback(address: str | None) -> bool:
    host = (urlsplit(address).hostname if "://" in address else address.rsplit(":", 1)[0]) if address else None
    return host in ("127.0.0.1", "localhost", "::1", "[::1]") or (host or "").startswith("127.")


def reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that answers a TCP connection within 5 s, or DataError: ray.init
    would otherwise retry an unreachable cluster for a minute before it says so."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"--address {address} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise DataError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def token_auth() -> None:
    """Connect as `ray start` serves: with token authentication when a token is at hand and RAY_AUTH_MODE is not
    set. Ray 2.60's `ray start --head` turns it on then (its token in ~/.ray/auth_token), but a driver connecting to
    that cluster does not, and fails after a minute of retries."""
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if "RAY_AUTH_MODE" not in os.environ and (token or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str | None) -> Any:
    """ray, initialized: on the cluster at `address`, or a local one for the run on loopback (None)."""
    if address is None or is_loopback(address):
        os.environ.setdefault(LOOPBACK, "0")  # read when ray is first imported
    if address not in (None, "auto"):
        reachable(address)
    if address is not None:
        token_auth()
    try:
        import ray
    except ImportError:
        raise DataError("--engine ray needs Ray Data: pip install 'modelship[ray]'") from None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(_node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    return ray


def pool(ray: Any, cfg: PredictConfig) -> tuple[int, int, int]:
    """(actors, CPUs each, GPUs each), sized so the pool can never hold every CPU: an actor pool that does can wait
    forever for the CPU Ray Data's own tasks need (ray-project/ray issue 44687)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cfg.device == "cuda" and gpus < 1:
        raise DataError("--device cuda but the Ray cluster has no GPU; use --device cpu")
    on_gpu = gpus >= 1 and cfg.device != "cpu"
    most = max(0, cpus - 1) if not on_gpu else min(gpus, max(0, cpus - 1))
    if most < 1:
        raise DataError(f"the Ray cluster has {cpus} CPU(s); --engine ray needs 2: one per actor, one for Ray Data")
    actors = cfg.actors or most
    if actors > most:
        has, each = (f"{cpus} CPUs and {gpus} GPUs", "1 CPU and 1 GPU") if on_gpu else (f"{cpus} CPUs", "1 CPU")
        raise DataError(
            f"--actors {actors}: the cluster has {has}, room for {most} actor(s) of {each}"
            " with one CPU left free for Ray Data's own tasks (a pool holding every CPU can wait forever, "
            "ray-project/ray issue 44687)"
        )
    return actors, 1, 1 if on_gpu else 0


# ------------------------------------------------------------------------------------------------------- the output


class Output:
    """The rows, written to `folder` as they arrive: Parquet part files of PART_ROWS rows, or one CSV or JSONL file
    (local predict's lines), and _errors.csv naming every file that could not be scored and why."""

    def __init__(self, folder: Path, fmt: str, logits: bool) -> None:
        self.folder, self.fmt, self.logits = folder, fmt, logits
        self.rows: list[dict[str, Any]] = []
        self.parts = self.scored = self.bad = 0
        self.errors = open(folder / ERRORS, "w", newline="")  # noqa: SIM115 (closed by close())
        self.error_rows = csv.writer(self.errors)
        self.error_rows.writerow(["path", "error"])
        self.text = None if fmt == "parquet" else open(folder / f"predictions.{fmt}", "w", newline="")  # noqa: SIM115
        if self.text is not None and fmt == "csv":
            self.text.write("path,label,index,score,top_k" + (",logits" if logits else "") + "\n")

    def add(self, row: dict[str, Any]) -> None:
        self.scored += 1
        if self.text is None:
            self.rows.append(row)
            if len(self.rows) >= PART_ROWS:
                self.flush()
        elif self.fmt == "csv" and self.logits:
            line = format_row(row, "csv")
            self.text.write(line[:-1] + "," + " ".join(repr(v) for v in row["logits"]) + "\n")
        else:
            self.text.write(format_row(row, self.fmt))

    def error(self, path: str, reason: str) -> None:
        self.bad += 1
        self.error_rows.writerow([path, reason])

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.rows:
            pq.write_table(pa.Table.from_pylist(self.rows), self.folder / f"part-{self.parts:05d}.parquet")
            self.parts += 1
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.errors.close()
        if self.text is not None:
            self.text.close()


def staging(out: Path) -> Path:
    """A fresh folder beside OUT to write into (renamed to OUT once every row is in)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def finish(folder: Path, out: Path) -> None:
    if out.exists():  # --force (checked up front)
        shutil.rmtree(out)
    folder.rename(out)


# ---------------------------------------------------------------------------------------------------------- the run


def score(cfg: PredictConfig) -> int:
    """Every source's images through the bundle on the cluster into cfg.output; 0 when all were scored, 1 when some
    could not be (named in OUT/_errors.csv)."""
    assert cfg.bundle is not None and cfg.output is not None
    start = time.perf_counter()
    manifest = check_bundle(cfg.bundle)
    entry = require_artifact(manifest, cfg.bundle, cfg.backend)
    files = sources(cfg.paths)
    classes = manifest["classes"]
    top_k = min(cfg.top_k, len(classes)) if cfg.top_k else default_top_k(len(classes))
    ray = connect(cfg.address)
    folder = None
    try:
        actors, cpus, gpus = pool(ray, cfg)
        import ray.data

        artifact = [ray.put((cfg.bundle / entry["path"]).read_bytes())]
        threads = max(1, math.ceil(int(ray.cluster_resources().get("CPU", 1)) / actors))
        log.info("scoring %d images on %d actor(s) (%d CPU, %d GPU each)", len(files), actors, cpus, gpus)
        ds = ray.data.from_items([{"path": p, "location": loc} for p, loc in files]).map_batches(
            Scorer,
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs=dict(
                manifest=manifest,
                backend=cfg.backend,
                artifact=artifact,
                threads=threads,
                device="cuda:0" if gpus else "cpu",
                top_k=top_k,
                logits=cfg.logits,
            ),
        )
        folder = staging(cfg.output)
        out = Output(folder, cfg.output_format, cfg.logits)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for row, error, path in zip(batch["row"], batch["error"], batch["path"], strict=True):
                if error:
                    out.error(str(path), str(error))
                else:
                    out.add(json.loads(row))
        out.close()
        finish(folder, cfg.output)
        folder = None
    except ray.exceptions.RayError as e:
        raise DataError(f"the Ray job failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        ray.shutdown()
    seconds = time.perf_counter() - start
    total = out.scored + out.bad
    bad = f"{out.bad} bad file(s), listed in {cfg.output / ERRORS}" if out.bad else "0 bad files"
    print(f"modelship predict: {total} images in {seconds:.1f} s ({total / seconds:.1f} images/s) on {actors} "
          f"actor(s), {out.scored} scored, {bad}: {cfg.output}", file=sys.stderr)  # fmt: skip
    return 1 if out.bad else 0
