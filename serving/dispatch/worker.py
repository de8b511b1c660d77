"""The inference worker: `InferenceWorker` holds every model version the model table lists (loaded and
warmed up before it counts as loaded) and runs dynamic batches, one forward pass per version.

A worker follows the table (modelship.serving.control.table) between batches and while idle: it loads what was
added on a thread of its own while it goes on answering with what it holds, unloads what was removed, and reports the
generation it holds everything of (with any version that failed to load here, and the memory each one took) with
its next request for work: that is how the controller knows a version is loaded everywhere before any request is
routed to it.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelship import allocator
from modelship.backends import Backend, load_backend
from modelship.errors import ArtifactError
from modelship.manifest import read_manifest
from modelship.serving import lifeline
from modelship.serving.config import Settings
from modelship.serving.control.evidence import ServiceTimes
from modelship.serving.control.table import Reader, Table, record_start_failure, resident_bytes
from modelship.serving.dispatch import transport
from modelship.serving.errors import RequestError
from modelship.serving.metrics import VersionStats, metrics
from modelship.serving.monitoring.window import Recorder

log = logging.getLogger(__name__)

Loaded = tuple[int, dict[str, "Held"], dict[str, str]]  # (table generation, loaded, failed)


class InferenceWorker:
    """The inference worker side: holds every model version the model table lists (loaded and warmed up), and runs
    dynamic batches, one forward pass per version. LitServe starts it in each worker process (compat.WorkerAPI); with
    --in-process, each API server runs one on a thread (in_process.Runner)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.addresses: transport.Addresses | None = None  # set by the server before the workers start
        self.device = "cpu"
        self.held: dict[str, Held] = {}  # model version -> its backend
        self.failed: dict[str, str] = {}  # model version -> why it did not load here
        self.refused: list[str] = []  # of those, the versions whose artifact its runtime refused (the bundle's fault)
        self.reader: Reader | None = None
        self.applied = 0  # the table generation this worker holds everything of
        self.loading: Future[Loaded] | None = None  # versions being loaded on a thread beside the serving
        self.loader: ThreadPoolExecutor | None = None
        self.unreported = True
        self.recorder = Recorder(settings.run_dir, settings.drift_window)  # this process's drift windows
        # how long each version's batches ran here: a rollout's latency evidence (control/evidence.py)
        self.service = ServiceTimes(settings.run_dir) if settings.rollout != "none" else None

    def setup(self, device: str) -> None:
        lifeline.follow(self.settings.main_pid)  # never outlive the main process
        allocator.keep_freed_memory()  # a spawned worker's allocator starts with the defaults
        # a spawned worker starts with no logging configuration
        logging.basicConfig(level=self.settings.log_level.upper(), format="%(message)s")
        self.device = device
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="modelship-loader")
        self.reader = Reader(self.settings.run_dir)
        self.reader.reload()  # the table as it is now; then at most every REFRESH seconds (refresh)
        table = self.reader.table
        self.absorb(self.load(table, self.missing(table)))  # at start there is nothing to serve meanwhile
        # a version asked for at start (with --in-process every version is): the server must not start without it
        if self.failed and (self.settings.in_process or not self.reader.table.started):
            record_start_failure(self.settings.run_dir, self.failed, self.refused)
            raise RuntimeError("; ".join(f"{k}: {why}" for k, why in self.failed.items()))

    def refresh(self) -> bytes | None:
        """Called between batches and while idle: follow the model table, loading new versions on a thread while
        this worker keeps answering with what it holds; this worker's status when it changed."""
        assert self.reader is not None and self.loader is not None
        self.recorder.flush()  # idle too: a window's last answers are written out
        if self.service is not None:
            self.service.flush()
        news = self.unreported
        if self.reader.poll():
            news = self.unload(self.reader.table) or news
        if self.loading is not None and self.loading.done():
            self.absorb(self.loading.result())
            self.loading, news = None, True
        table = self.reader.table
        missing = self.missing(table) if self.loading is None else []
        if missing:  # worked out here: the loading thread reads nothing this one changes
            self.loading = self.loader.submit(self.load, table, missing)
        elif self.loading is None and self.applied != table.generation:
            self.applied, news = table.generation, True
        if not news:
            return None
        self.unreported = False
        rss = {k: h.resident_bytes for k, h in self.held.items()}
        return json.dumps({"generation": self.applied, "failed": self.failed, "rss": rss}).encode()

    def missing(self, table: Table) -> list[str]:
        return [k for k in table.held() if k not in self.held and k not in self.failed]

    def unload(self, table: Table) -> bool:
        """Drop what the table no longer holds (the controller removes a version only once it has drained)."""
        wanted = table.held()
        gone = [k for k in self.held if k not in wanted]
        for key in gone:
            del self.held[key]
            log.info("model %s unloaded", key)
        if gone:
            gc.collect()
            allocator.give_back()  # a model's worth: to the system now (the raised trim threshold keeps it)
        self.failed = {k: why for k, why in self.failed.items() if k in wanted}
        return bool(gone)

    def load(self, table: Table, keys: list[str]) -> Loaded:
        """Load the versions `keys` of `table` (those it holds and this worker lacks), each warmed up at its largest
        batch before it counts as loaded (first calls allocate and pick kernels): (the table's generation, loaded,
        failed)."""
        held: dict[str, Held] = {}
        failed: dict[str, str] = {}
        for key in keys:
            version = table.versions[key]
            before = resident_bytes()
            try:
                held[key] = load_version(Path(version.path), self.settings, self.device)
                held[key].recorder, held[key].service = self.recorder, self.service
            except ArtifactError as e:  # the file is not what it should be: one line, and the bundle is at fault
                log.error("model %s cannot be served: %s", key, e.detail)
                log.debug("the runtime's error", exc_info=True)
                failed[key] = e.detail
                self.refused.append(key)
                continue
            except Exception as e:  # any other failure to load: the version is unavailable
                log.exception("model %s failed to load", key)
                failed[key] = f"failed to load on a worker: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                continue
            held[key].resident_bytes = max(0, resident_bytes() - before)
            log.info(
                "model %s ready on %s: %s via %s",
                key,
                self.device,
                self.settings.backend,
                ", ".join(held[key].backend.providers),
            )
        return table.generation, held, failed

    def absorb(self, loaded: Loaded) -> None:
        """Take in what a load brought, as far as the table (which may have moved on meanwhile) still holds it."""
        generation, held, failed = loaded
        assert self.reader is not None
        wanted = self.reader.table.held()
        self.held.update({k: h for k, h in held.items() if k in wanted})
        self.failed.update({k: why for k, why in failed.items() if k in wanted})
        # everything of the load's table is held (or failed); of the table now, too when nothing more is missing
        table = self.reader.table
        self.applied = table.generation if not self.missing(table) else max(self.applied, generation)

    def after(self) -> None:
        """Once a batch's answers have gone: its answers into the drift windows (off the answer path)."""
        self.recorder.flush()
        if self.service is not None:
            self.service.flush()

    def run(self, requests: list[transport.Request]) -> list[Any]:
        """One dynamic batch: each model version's requests through its backend together, in chunks of at most its
        max batch (a forward pass never mixes versions); every request's logits back in order."""
        out: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.key, []).append(i)
        for key, idx in groups.items():
            held = self.held.get(key)
            if held is None:  # routed in the instant it was unloaded, or failed here: not served by this worker
                error = RequestError(f"model version {key} is not loaded; retry", 503)
                for i in idx:
                    out[i] = error
                continue
            for i, logits in zip(idx, held.run([requests[i] for i in idx], key), strict=True):
                out[i] = logits
        return out


NON_FINITE = RequestError("input contains NaN or infinity; expected finite numbers", 400)


@dataclass
class Held:
    """One model version in a worker: its backend, input shape and largest batch."""

    backend: Backend
    shape: tuple[int, ...]
    chunk: int
    resident_bytes: int = 0
    labelled: tuple[Any, ...] | None = None
    stats: VersionStats | None = None  # Triton's statistics of this version, in this process
    recorder: Recorder | None = None  # live drift's windows of this process
    service: ServiceTimes | None = None  # service times, under --rollout

    def run(self, requests: list[transport.Request], key: str) -> list[Any]:
        """Each request's logits, or NON_FINITE for one whose input holds NaN or infinity (the others run). The check
        is here, once per batch, rather than per request in the API server: a numpy pass over an image lets go of
        the GIL, and in an API server that runs the model (--in-process) each such release wakes the inference
        thread waiting for it (BENCHMARKS.md, gRPC)."""
        began = time.monotonic_ns()
        x = np.concatenate([r.x for r in requests]) if len(requests) > 1 else requests[0].x
        if not np.isfinite(x).all():  # rare: find the requests at fault and run the rest without them
            finite = [bool(np.isfinite(r.x).all()) for r in requests]
            rest = [r for r, ok in zip(requests, finite, strict=True) if ok]
            ran = iter(self.run(rest, key) if rest else [])
            return [next(ran) if ok else NON_FINITE for ok in finite]
        m = metrics()
        if self.labelled is None:  # this version's labelled metrics, looked up once (labels() costs a lock a call)
            name, version = key.rsplit("/", 1)
            self.labelled = tuple(h.labels(name, version) for h in (m.batch_size, m.batch_requests, m.inference))
            self.stats = VersionStats(name, version)
        batch_size, batch_requests, inference = self.labelled
        start = time.monotonic()
        inputs_ns = time.monotonic_ns() - began
        queued = 0.0
        for r in requests:
            waited = start - r.queued_at
            m.queue.observe(waited)
            queued += waited
        outs, chunks = [], []
        for i in range(0, len(x), self.chunk):
            part = x[i : i + self.chunk]
            t0 = time.monotonic_ns()
            outs.append(self.backend(part))
            chunks.append((len(part), time.monotonic_ns() - t0))
            batch_size.observe(len(part))
        batch_requests.observe(len(requests))
        took = time.monotonic() - start
        inference.observe(took)
        if self.service is not None:
            self.service.add(key, took, len(requests))
        split = time.monotonic_ns()
        logits = np.concatenate(outs) if len(outs) > 1 else outs[0]
        answers, at = [], 0
        for r in requests:  # (np.split costs 5 us a batch more)
            answers.append(logits[at : at + len(r.x)])
            at += len(r.x)
        if self.recorder is not None:
            self.recorder.note(key, logits, x)
        assert self.stats is not None
        self.stats.execution(len(requests), int(queued * 1e9), inputs_ns, chunks, time.monotonic_ns() - split)
        return answers


def load_version(path: Path, settings: Settings, device: str) -> Held:
    """A bundle's artifact for --backend, loaded and warmed up at its largest batch, 1, and the largest again."""
    manifest = read_manifest(path)
    artifact = path / manifest["artifacts"][settings.backend]["path"]
    backend = load_backend(settings.backend, artifact, device, settings.threads)
    shape = tuple(int(v) for v in manifest["input"]["shape"][1:])
    chunk = int(manifest.get("max_batch", 64))
    for n in (chunk, 1, chunk):
        backend(np.zeros((n, *shape), np.float32))
    return Held(backend, shape, chunk)
