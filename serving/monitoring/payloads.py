"""The payload log (`--log-payloads DEST --log-sample F [--log-inputs]`): a record of each sampled request — when,
which model version, its id and protocol, the input's shape, sha256 and per-image channel means (the input itself
with --log-inputs), the answer's top classes, the latency and the status — written by a thread of each API server,
never by the request: the request only offers it to a bounded queue, and what does not fit is dropped and counted
(`modelship_payload_log_dropped_total`), and said in the log.

DEST is a folder (JSON lines, one file per API server, rotated at --log-max-mb, each line written whole in one
write(2)) or an http(s) URL: every record goes there as two CloudEvents in the binary mode KServe's logger sends
(`ce-type` org.kubeflow.serving.inference.request and .response, the same `ce-id`), so what consumes KServe's events
consumes these. A sink that does not answer is retried a bounded number of times, then the record is dropped and
counted; it never holds a request.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from modelship.scores import default_top_k, prediction
from modelship.serving.metrics import metrics

log = logging.getLogger(__name__)

QUEUE = 10_000  # records waiting for the writer at most; more are dropped, never waited for
DRAIN = 0.2  # seconds between the writer's turns
ATTEMPTS = (0.0, 0.2, 1.0)  # a sink's tries, and the pause before each
SINK_TIMEOUT = 2.0  # seconds a sink may take to answer one event
WARN_EVERY = 60.0  # seconds between the log lines that say records were dropped


@dataclass
class Item:
    """What a request leaves for the log: built into a record on the writer's thread, off the request's path."""

    time: float
    model: str
    version: str
    classes: tuple[str, ...]
    names: tuple[str, str]  # the input's and the output's tensor names
    protocol: str
    request_id: str | None
    x: np.ndarray
    logits: np.ndarray | None
    status: int
    error: str | None
    latency: float


def record(item: Item, inputs: bool) -> dict[str, Any]:
    """One line of the log."""
    x = np.ascontiguousarray(item.x, "<f4")
    rec: dict[str, Any] = {
        "time": datetime.fromtimestamp(item.time, timezone.utc).isoformat(timespec="milliseconds"),
        "model": item.model,
        "version": item.version,
        "id": item.request_id or uuid.uuid4().hex,
        "protocol": item.protocol,
        "status": item.status,
        "latency_ms": round(item.latency * 1000, 3),
        "input": {
            "name": item.names[0],
            "shape": list(x.shape),
            "datatype": "FP32",
            "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
            "channel_means": x.mean(axis=(2, 3), dtype=np.float64).tolist(),
        },
    }
    if inputs:
        rec["input"]["data"] = base64.b64encode(x.tobytes()).decode()  # little-endian float32, row-major
    if item.logits is not None:
        k = default_top_k(len(item.classes))
        rec["answers"] = [prediction(row, item.classes, k) for row in item.logits]
    else:
        rec["error"] = item.error
    return rec


class Folder:
    """JSON lines in `folder`, a file per process, rotated at `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.stem = f"payloads-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{os.getpid()}"
        self.part, self.size, self.fd = 0, 0, -1

    def write(self, rec: dict[str, Any]) -> bool:
        line = (json.dumps(rec) + "\n").encode()
        if self.fd < 0 or (self.size and self.size + len(line) > self.max_bytes):
            self.rotate()
        os.write(self.fd, line)  # one write(2) of the whole line: a reader, or a kill, never sees half of one
        self.size += len(line)
        return True

    def rotate(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.part += 1
        path = self.folder / f"{self.stem}-{self.part:04d}.jsonl"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Sink:
    """Each record as KServe's logger sends it: a request and a response CloudEvent (binary mode) to `url`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def write(self, rec: dict[str, Any]) -> bool:
        request = {"id": rec["id"], "inputs": [rec["input"]]}
        answer = {"answers": rec["answers"]} if "answers" in rec else {"error": rec["error"]}
        response = {"model_name": rec["model"], "model_version": rec["version"], "id": rec["id"], **answer}
        response |= {"status": rec["status"], "latency_ms": rec["latency_ms"]}
        return all(self.send(rec, kind, body) for kind, body in (("request", request), ("response", response)))

    def send(self, rec: dict[str, Any], kind: str, body: dict[str, Any]) -> bool:
        headers = {
            "Content-Type": "application/json",
            "Ce-Specversion": "1.0",
            "Ce-Id": rec["id"],
            "Ce-Type": f"org.kubeflow.serving.inference.{kind}",
            "Ce-Source": f"modelship://{rec['model']}/{rec['version']}",
            "Ce-Time": rec["time"],
            "Ce-Inferenceservicename": rec["model"],
            "Ce-Component": "predictor",
            "Ce-Endpoint": rec["version"],
        }
        data = json.dumps(body).encode()
        for pause in ATTEMPTS:
            time.sleep(pause)
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers), timeout=SINK_TIMEOUT):
                    return True
            except OSError:  # refused, unreachable, timed out, or an HTTP error status: try again, then drop
                continue
        return False

    def close(self) -> None:
        pass


class PayloadLog:
    """This API server's payload log: `offer` on the request's path, everything else on its thread, which wakes every
    DRAIN seconds and writes what has queued since as one batch: a request never wakes it (a wake-up, and the GIL
    handed to the writer, for every logged request cost the event loop more than the records themselves)."""

    def __init__(self, dest: str, sample: float, inputs: bool, max_bytes: int) -> None:
        self.sample, self.inputs = sample, inputs
        self.writer: Folder | Sink = Sink(dest) if "://" in dest else Folder(Path(dest), max_bytes)
        self.queue: collections.deque[Item] = collections.deque()  # appends and pops are atomic: no lock
        self.dropped: dict[str, int] = {}
        self.warned = 0.0
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()

    def offer(self, item: Item) -> None:
        """Queue a request's record if it is sampled; never blocks: a full queue drops it."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if self.thread is None:  # started in the process that logs (an API server, after the fork)
            self.thread = threading.Thread(target=self._run, name="modelship-payload-log", daemon=True)
            self.thread.start()
        if len(self.queue) >= QUEUE:
            self.drop("queue_full")
            return
        self.queue.append(item)

    def _run(self) -> None:
        while not self.stop.wait(DRAIN):
            self.drain()
        self.drain()

    def drain(self) -> None:
        """Write every record queued now."""
        while self.queue:
            item = self.queue.popleft()
            try:
                written = self.writer.write(record(item, self.inputs))
            except Exception:
                log.exception("a payload log record could not be written")
                written = False
            if written:
                metrics().payloads_written.inc()
            else:
                self.drop("sink" if isinstance(self.writer, Sink) else "write")

    def drop(self, reason: str) -> None:
        metrics().payloads_dropped.labels(reason).inc()
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if time.monotonic() - self.warned >= WARN_EVERY:
            self.warned = time.monotonic()
            log.warning("payload log: records dropped so far in this process, by reason: %s", self.dropped)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to `timeout` seconds), then close: SIGTERM leaves no record half-written."""
        if self.thread is not None:
            self.stop.set()
            self.thread.join(timeout)  # a writer stuck on a sink: what is left goes with the process
        self.writer.close()
