"""The data plane: what every protocol of an API server calls, HTTP (http_api) and gRPC (grpc_service) alike.

Readiness, a model's readiness, routing a request to a model version (the catalog), inference through this API
server's dispatcher (the workers' transport, or its own model with --in-process), the repository's index and its
load/unload requests, and the API key. A protocol parses its own messages into these calls and writes their results
in its own format; the rules and their messages live here once, as KServe's python server has them
(`protocol/dataplane.py` under `protocol/rest` and `protocol/grpc`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

import numpy as np

from modelship.serving.config import Settings
from modelship.serving.control import requests, rollout
from modelship.serving.control.catalog import Catalog, Pairing, Served
from modelship.serving.control.evidence import COPIES, Tally
from modelship.serving.control.table import REFRESH, RUNNING, index
from modelship.serving.dispatch import broker, transport
from modelship.serving.dispatch.base import Dispatcher
from modelship.serving.errors import RequestError
from modelship.serving.extensions import model_config, statistics
from modelship.serving.metrics import VersionStats, metrics
from modelship.serving.monitoring.drift import read_document
from modelship.serving.monitoring.payloads import Item, PayloadLog

log = logging.getLogger(__name__)

CANARY_KEY = b"x-canary-key"  # a request header (gRPC metadata): the same key, the same side of a canary


class DataPlane:
    """One API server's view of the models and its way to them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = Catalog(settings.run_dir, settings.backend)
        self.addresses: transport.Addresses | None = None  # set by the server before the API servers fork
        self.consumer = 0  # this API server's number: where the workers send its answers
        # how this API server reaches the models: its own (--in-process, set by the server after the fork) or the
        # workers' transport (made on the first request, inside this process's event loop)
        self.dispatcher: Dispatcher | None = None
        self.counters: dict[tuple[str, str], Any] = {}  # (version, protocol) -> its inferences counter
        self.stats: dict[str, VersionStats] = {}  # version -> its statistics' counters in this process
        # the payload log: made in the process that logs (an API server, after the fork; the spec that holds this
        # data plane is pickled into the workers, and a log's queue cannot be)
        self.logging = settings.log_payloads is not None
        self.payloads: PayloadLog | None = None
        self.tally = Tally(settings.run_dir)  # this API server's counts of the rollouts it routes

    def ready(self) -> bool:
        """This API server can answer now: every model asked for at start has loaded (or failed) and one is READY,
        and its own models are loaded (--in-process) or the broker is up and at least one worker has asked it for
        work (Kubernetes' readiness: a restarting worker beside a serving one is not a reason to leave the load
        balancer)."""
        table = self.catalog.table
        if not table.started:
            table = self.catalog.fresh()  # starting: another API server may already have seen the models load
        if not (table.started and (table.names() or self.settings.model_control == "explicit")):
            return False  # (explicit control may start with nothing loaded, and take load requests: as Triton)
        return self.dispatcher.ready() if self.dispatcher is not None else broker.broker_ready()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """A model (version) can answer: READY here, and this server ready. False while it loads or is unloaded
        from routing; RequestError 404 for a model or version that is not there."""
        try:
            self.catalog.resolve(name, version)
        except RequestError as e:
            if e.status != 503:
                raise
            return False
        return self.ready()

    def resolve(self, name: str, version: str | None = None) -> Served:
        """The model version a request goes to (no version: the newest READY one), or RequestError 404 / 503."""
        return self.catalog.resolve(name, version)

    def route(self, name: str, version: str | None, key: bytes | None = None) -> tuple[Served, Pairing | None]:
        """The model version a request goes to, and under a rollout its pairing (catalog.route): `key` is the
        request's X-Canary-Key."""
        served, pair = self.catalog.route(name, version, key)
        if self.catalog.table.rollouts:  # every request a rollout routes, for the canary's measured share
            r = self.catalog.table.rollouts.get(name)
            if r is not None and r.state == RUNNING and version in (None, ""):
                self.tally.routed(r)
        return served, pair

    async def infer(
        self, served: Served, x: np.ndarray, protocol: str, request_id: str | None = None, pair: Pairing | None = None
    ) -> np.ndarray:
        """One validated array through a model version (the inference workers, or this process's own): its
        logits, or RequestError (504 on --timeout, the worker's status otherwise). Counted in the version's
        statistics, and offered to the payload log; under a rollout (`pair`), counted for it, and the partner's
        copy started beside it (never waited for)."""
        if self.dispatcher is None:
            assert self.addresses is not None
            self.dispatcher = transport.Client(self.addresses, self.consumer)
        copy = self.copy(pair, x) if pair is not None else None
        start = time.perf_counter_ns()
        try:
            logits = await self.dispatcher.call(served.key, x, self.settings.timeout)
        except (TimeoutError, RequestError) as e:
            error = (
                e
                if isinstance(e, RequestError)
                else RequestError(f"no answer within the {self.settings.timeout:g}s request timeout (--timeout)", 504)
            )
            self.count(served, "fail", start)
            if error.status >= 500 and error.status not in (503, 504):
                log.error("inference failed: %s", error.message)
            self.log_payload(served, x, protocol, request_id, None, error, start)
            if pair is not None:
                self.settle(pair, served, None, start, copy)
            raise error from None
        key = (served.key, protocol)
        if key not in self.counters:  # a labelled child per version and protocol, looked up once (3 us a request)
            self.counters[key] = metrics().inferences.labels(served.model.name, served.version, protocol)
        self.counters[key].inc()  # the statistics' success count too
        self.count(served, "success", start)
        if self.logging:
            self.log_payload(served, x, protocol, request_id, logits, None, start)
        if pair is not None:
            self.settle(pair, served, logits, start, copy)
        return logits

    def copy(self, pair: Pairing, x: np.ndarray) -> asyncio.Future[np.ndarray | None] | None:
        """The partner's run of a rollout's request, started now; None when COPIES are running already (the server
        is overloaded: the copy is dropped, and counted)."""
        if self.tally.inflight >= COPIES:
            self.tally.drop(pair.rollout)
            return None
        self.tally.inflight += 1
        return asyncio.ensure_future(self.run_copy(pair, x))

    async def run_copy(self, pair: Pairing, x: np.ndarray) -> np.ndarray | None:
        """The partner's logits, or None when it failed; counted for the partner's role."""
        assert self.dispatcher is not None
        start = time.perf_counter_ns()
        try:
            logits: np.ndarray | None = await self.dispatcher.call(
                pair.partner.key, pair.copied(x), self.settings.timeout
            )
        except (TimeoutError, RequestError):
            logits = None
        finally:
            self.tally.inflight -= 1
        role = "candidate" if pair.role == "serving" else "serving"
        self.tally.answered(pair.rollout, role, logits is not None, (time.perf_counter_ns() - start) / 1e9)
        return logits

    def settle(
        self,
        pair: Pairing,
        served: Served,
        logits: np.ndarray | None,
        start: int,
        copy: asyncio.Future[np.ndarray | None] | None,
    ) -> None:
        """A rollout's request answered: counted for the version that answered, and compared with the copy once
        it is back."""
        self.tally.answered(pair.rollout, pair.role, logits is not None, (time.perf_counter_ns() - start) / 1e9)
        if copy is None:
            return

        def compare(done: asyncio.Future[np.ndarray | None]) -> None:
            other = None if done.cancelled() or done.exception() is not None else done.result()
            labels = None
            if logits is not None and other is not None:
                mine = [served.model.classes[i] for i in logits.argmax(axis=1)]
                theirs = [pair.partner.model.classes[i] for i in other.argmax(axis=1)]
                labels = (mine, theirs)
            self.tally.pair(pair.rollout, labels)

        copy.add_done_callback(compare)

    def rollout(self, name: str) -> dict[str, Any]:
        """A model's rollout: the controller's last look at the one in progress, or the last one; 404 for a model
        that is not there."""
        table = self.catalog.table
        if not any(v.name == name for v in table.versions.values()):
            self.resolve(name)  # the 404 (or 503) that names what there is
        if self.settings.rollout == "none":
            return {"model": name, "mode": "none", "state": "off", "reason": "--rollout none: a new version swaps in"}
        doc = rollout.read_document(self.settings.run_dir, name)
        if doc is None:
            why = "none yet: one starts when a newer version of the model loads beside the serving one"
            return {"model": name, "mode": self.settings.rollout, "state": "none", "reason": why}
        return doc

    def log_payload(
        self,
        served: Served,
        x: np.ndarray,
        protocol: str,
        request_id: str | None,
        logits: np.ndarray | None,
        error: RequestError | None,
        start: int,
    ) -> None:
        """Offer the request to the payload log (--log-payloads), which samples it and never blocks."""
        if not self.logging:
            return
        if self.payloads is None:
            s = self.settings
            assert s.log_payloads is not None
            self.payloads = PayloadLog(s.log_payloads, s.log_sample, s.log_inputs, int(s.log_max_mb * 2**20))
        m = served.model
        item = Item(
            time=time.time(),
            model=m.name,
            version=served.version,
            classes=m.classes,
            names=(m.input_name, m.output_name),
            protocol=protocol,
            request_id=request_id,
            x=x,
            logits=logits,
            status=error.status if error else 200,
            error=error.message if error else None,
            latency=(time.perf_counter_ns() - start) / 1e9,
        )
        self.payloads.offer(item)

    def drift(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The live drift of a version (no version: the newest READY one): the main process's last look."""
        served = self.resolve(name, version)
        if not self.settings.drift_window:
            return {"model": name, "version": served.version, "status": "off", "reasons": ["--drift-window 0"]}
        doc = read_document(self.settings.run_dir, served.key)
        if doc is None:  # the first look is at most a second away
            return {
                "model": name,
                "version": served.version,
                "status": "collecting",
                "reasons": ["no look yet"],
                "window": {"size": self.settings.drift_window, "answers": 0},
            }
        return doc

    def close(self) -> None:
        """At this API server's end: what the payload log holds is written first."""
        if self.payloads is not None:
            self.payloads.close()

    def count(self, served: Served, outcome: str, start: int) -> None:
        """A request's outcome in the version's statistics (success: its count is `inferences`')."""
        stats = self.stats.get(served.key)
        if stats is None:
            stats = self.stats[served.key] = VersionStats(served.model.name, served.version)
        if outcome != "success":
            stats.add(f"{outcome}_count", 1)
        stats.add(f"{outcome}_ns", time.perf_counter_ns() - start)

    def config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration of a version (no version: the newest READY one)."""
        return model_config(self.resolve(name, version), self.settings)

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics: of one model's READY versions (or the one version asked for), or with no name of
        every READY version the server holds; a model that is not there is RequestError 404, as for inference."""
        if name is None:
            table = self.catalog.table
            keys = [(v.name, str(v.version)) for n in table.names() for v in table.ready(n)]
        elif version is None:
            self.resolve(name)
            keys = [(name, str(v.version)) for v in self.catalog.table.ready(name)]
        else:
            keys = [(name, self.resolve(name, version).version)]
        return statistics(sorted(keys, key=lambda k: (k[0], int(k[1]))))

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The repository index as Triton answers it: every model, each version with its state and reason (a
        rollout's versions: their role, and how far it is)."""
        table = self.catalog.fresh()
        rows = index(table, ready_only=ready_only)
        running = {name: r for name, r in table.rollouts.items() if r.state == RUNNING}
        for row in rows:
            r = running.get(row["name"])
            if r is not None and row["version"] in (str(r.serving), str(r.candidate)) and not row["reason"]:
                row["reason"] = self.rollout_line(r, row["version"] == str(r.candidate))
        return rows

    def rollout_line(self, r: Any, candidate: bool) -> str:
        if not candidate:
            return f"serving; version {r.candidate} is rolled out beside it ({r.mode})"
        if r.blocked:
            return f"candidate ({r.mode}), waiting: {r.reason}"
        doc = rollout.read_document(self.settings.run_dir, r.name) or {}
        compared = doc.get("requests", {}).get("compared", 0)
        return f"candidate ({r.mode}): {compared} of {r.target} requests compared"

    async def repository_change(self, op: str, name: str, parameters: list[str]) -> dict[str, Any]:
        """A load or unload of `name`, or a promote or abort of its rollout, by the controller, returned once it is
        done (the rollout's outcome); RequestError when it failed."""
        if op in ("promote", "abort"):
            if self.settings.rollout == "none":
                raise RequestError(f"this server does not roll out new versions (--rollout none); nothing to {op}", 409)
            answer = await asyncio.to_thread(requests.ask, self.settings.run_dir, {"op": op, "name": name})
            await asyncio.sleep(REFRESH)  # every API server routes by the new table before the client hears of it
            return dict(json.loads(answer))
        await asyncio.to_thread(
            requests.change, self.settings.run_dir, self.settings.model_control, op, name, parameters
        )
        return {}


def authorized(api_key: bytes, headers: dict[bytes, bytes]) -> bool:
    """The API key is given as X-API-Key or Authorization: Bearer (HTTP headers, or gRPC metadata, lower-cased)."""
    given = headers.get(b"x-api-key")
    if given is None:
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
    return given is not None and hmac.compare_digest(given, api_key)
