"""The model controller: a thread of the server's main process that owns the model table
(modelship.serving.control.table) and decides what the workers hold, by Triton's model-control modes.

- `none`: every model of the repository (or the one bundle) is loaded at start; nothing changes after.
- `poll`: the same at start, then the repository is scanned every --poll-interval seconds: a version that appears is
  loaded, one whose folder goes is drained and unloaded.
- `explicit`: the --load-model models at start, then what POST /v2/repository/models/{name}/load and /unload ask.

An update never fails a request: a new version is checked (sha256, every gate passed, the --backend artifact) and added
LOADING; every worker loads and warms it up beside what it serves; it turns READY (routed) only when every live worker
has it. Under --version-policy latest the version it replaces then turns UNLOADING: no new requests, and once the
broker holds none of its requests (and the API servers have seen the change) it leaves the table and the workers
unload it. A version that fails to load never serves: it is UNAVAILABLE with the reason, and what served stays.

API servers reach the controller over a ZeroMQ socket in the server's run folder (control.requests).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from modelship import repository
from modelship.errors import ConfigError, ModelshipError
from modelship.files import sha256_file
from modelship.serving.control.evidence import Policy
from modelship.serving.control.requests import Waiting, address, answer, reply
from modelship.serving.control.rollout import Keeper
from modelship.serving.control.table import (
    HELD,
    LOADING,
    READY,
    RUNNING,
    UNAVAILABLE,
    UNLOADING,
    Table,
    Version,
    drop_manifest,
    keep_manifest,
    kept_manifest,
    key_of,
)

log = logging.getLogger(__name__)

DRAIN_MIN = 0.5  # seconds an UNLOADING version stays at least: every API server has read the table by then


def verify(path: Path, backend: str) -> dict[str, Any]:
    """The manifest of a version that may be served: hashes match (its reference's too, which must be its own),
    every gate passed, it has the --backend artifact."""
    from modelship import reference
    from modelship.manifest import check_bundle, require_artifact, require_passed

    manifest = check_bundle(path)
    require_passed(manifest, path)
    require_artifact(manifest, path, backend)
    reference.read(path, manifest)
    return manifest


def fingerprint(path: Path) -> str:
    """A version's manifest's sha256 (it names every artifact's): "" when it cannot be read."""
    try:
        return sha256_file(path / "manifest.json")
    except OSError:
        return ""


def wanted(versions: dict[int, Path], policy: str) -> dict[int, Path]:
    """The versions a model serves: its newest (latest), or every one (all)."""
    if policy == "all":
        return dict(versions)
    newest = max(versions)
    return {newest: versions[newest]}


class Controller:
    def __init__(
        self,
        source: Path,
        run_dir: str,
        backend: str,
        mode: str = "none",
        policy: str = "latest",
        load: tuple[str, ...] = (),
        poll_interval: float = 5.0,
        static: bool = False,
        rollouts: Policy | None = None,
    ) -> None:
        self.source, self.run_dir, self.backend = source, run_dir, backend
        self.mode, self.policy, self.load, self.poll_interval = mode, policy, load, poll_interval
        self.static = static  # --in-process: each API server loads the start table itself; it never changes
        self.table = Table()
        self.broker: Any = None  # set when the broker is up (its snapshot says what the workers hold)
        self.waiting: list[Waiting] = []
        self.since: dict[str, float] = {}  # UNLOADING versions: since when
        self.problems: dict[str, str] = {}  # the repository's unusable model folders, as the scan words them
        self.gone: set[str] = set()  # READY versions whose folder left, serving from memory until their successor is
        self.next_scan = 0.0
        self.dirty = False
        self.keeper = Keeper(run_dir, rollouts or Policy(), self.set, lambda key: kept_manifest(run_dir, key))

    @classmethod
    def for_config(cls, cfg: Any, run_dir: str) -> Controller:
        """The controller of a server for `cfg` (a ServeConfig), writing its table in `run_dir`."""
        return cls(
            cfg.bundle,
            run_dir,
            cfg.backend,
            cfg.model_control,
            cfg.version_policy,
            cfg.load_models,
            cfg.poll_interval,
            static=cfg.in_process,
            rollouts=cfg.policy,
        )

    # ------------------------------------------------------------------------------------------ start

    def start_table(self) -> Table:
        """The table at start, written to the run folder; ConfigError / BundleError (exit 2) when a model asked for
        cannot be served: a layout problem of the repository, a version failing its checks, an unknown name."""
        if repository.is_bundle(self.source):
            if self.mode != "none":
                raise ConfigError(f"--model-control {self.mode} needs a model repository; {self.source} is a bundle")
            name = verify(self.source, self.backend)["name"]
            self.table.known = [name]
            self.add(name, 1, self.source)
        else:
            found, problems = repository.scan(self.source)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ConfigError(f"model repository {self.source}: {next(iter(problems.values()))}{more}")
            names = self.start_names(found)
            self.table.known = sorted(found)
            for name in names:
                for version, path in wanted(found[name], self.policy).items():
                    verify(path, self.backend)
                    self.add(name, version, path)
        if self.static:
            for v in self.table.versions.values():
                v.state = READY
        self.table.started = self.static or not self.table.versions
        self.write()
        return self.table

    def start_names(self, found: dict[str, dict[int, Path]]) -> list[str]:
        if self.mode != "explicit" or "*" in self.load:
            return sorted(found)
        unknown = [n for n in self.load if n not in found]
        if unknown:
            raise ConfigError(
                f"--load-model {unknown[0]}: no such model in {self.source} (it has {', '.join(sorted(found))})"
            )
        return sorted(set(self.load))

    def add(self, name: str, version: int, path: Path, state: str = LOADING, reason: str = "") -> None:
        entry = Version(name, version, str(path.resolve()), state, self.public(reason), added=self.table.generation + 1,
                        fingerprint=fingerprint(path))  # fmt: skip
        if state != UNAVAILABLE:
            keep_manifest(self.run_dir, entry.key, entry.path)
        self.table.versions[entry.key] = entry
        self.dirty = True

    def write(self) -> None:
        self.table.generation += 1
        self.table.write(self.run_dir)
        self.dirty = False

    # ------------------------------------------------------------------------------------------ the thread

    def start(self, broker: Any) -> None:
        self.broker = broker
        threading.Thread(target=self._run, name="modelship-model-controller", daemon=True).start()

    def _run(self) -> None:
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(address(self.run_dir))
        while True:
            try:
                if sock.poll(100):
                    self.take(sock, sock.recv_multipart())
                self.step(time.monotonic())
                self.answer(sock)
            except Exception:
                log.exception("the model controller failed a step; it carries on")
                time.sleep(0.1)

    def step(self, now: float) -> None:
        """Promote what every worker loaded, mark what failed, remove what drained, rescan when due; write the
        table when anything changed."""
        live, outstanding = self.broker.snapshot if self.broker is not None else ({}, {})
        reports = [s for s in live.values() if s is not None]
        for v in [v for v in self.table.versions.values() if v.state == LOADING]:
            failed = [r["failed"][v.key] for r in reports if v.key in r.get("failed", {})]
            if failed:
                self.set(v, UNAVAILABLE, failed[0])
                log.error("model %s version %d did not load: %s", v.name, v.version, failed[0])
            elif reports and len(reports) == len(live) and all(r["generation"] >= v.added for r in reports):
                self.set(v, READY)
                log.info("model %s version %d is ready on every worker", v.name, v.version)
        self.retire_gone()
        if self.keeper.step(self.table, self.gone, now):
            self.dirty = True
        if self.policy == "latest":  # a model's newest READY version serves (beside a rollout's candidate)
            keep = {name: self.staying(name) for name in self.table.names()}
            for v in self.table.versions.values():
                stay = keep.get(v.name)
                if stay and v.state in (READY, LOADING) and v.version < max(stay) and v.version not in stay:
                    self.set(v, UNLOADING)
        for v in self.table.versions.values():
            rss = sum(r.get("rss", {}).get(v.key, 0) for r in reports)
            if v.state == READY and rss and rss != v.resident_bytes:
                v.resident_bytes, self.dirty = rss, True
        for v in [v for v in self.table.versions.values() if v.state == UNLOADING]:
            if now - self.since.get(v.key, now) >= DRAIN_MIN and not outstanding.get(v.key.encode()):
                if v.then == UNAVAILABLE:  # rolled back: listed, with why, until it changes or is loaded again
                    v.state, v.then, v.resident_bytes = UNAVAILABLE, "", 0
                else:
                    del self.table.versions[v.key]
                drop_manifest(self.run_dir, v.key)
                self.since.pop(v.key, None)
                self.dirty = True
                log.info("model %s version %d drained and unloaded", v.name, v.version)
        if self.mode != "none" and now >= self.next_scan:
            self.next_scan = now + self.poll_interval
            self.rescan()
        if not self.table.started and not any(v.state == LOADING for v in self.table.versions.values()):
            self.table.started = self.dirty = True
        if self.dirty:
            self.write()

    def staying(self, name: str) -> set[int]:
        """Under --version-policy latest, the versions of a model that stay: its newest READY one whose folder is
        there, or a rollout's two."""
        r = self.table.rollouts.get(name)
        if r is not None and r.state == RUNNING:
            return {r.serving, r.candidate}
        return {max((v.version for v in self.table.ready(name) if v.key not in self.gone), default=0)}

    def set(self, v: Version, state: str, reason: str = "") -> None:
        v.state, v.reason = state, self.public(reason)
        if state == UNLOADING:
            self.since[v.key] = time.monotonic()
        self.dirty = True

    # ------------------------------------------------------------------------------------------ the repository

    def rescan(self, only: str | None = None) -> dict[str, dict[int, Path]]:
        """Read the repository again: its models and problems for the index; under poll (or for a load request's
        model), load what is wanted and not held, and unload what is held and gone. What serves stays when the
        repository cannot be read or a model's folder has a problem."""
        try:
            found, problems = repository.scan(self.source)
        except ModelshipError as e:
            log.warning("the model repository cannot be read (%s); what is loaded keeps serving", e)
            return {}
        if problems != self.problems or sorted(found) != self.table.known:
            self.log_problems(problems)
            self.problems = problems
            self.table.problems = {name: self.public(why) for name, why in problems.items()}
            self.table.known, self.dirty = sorted(found), True
        for name in [only] if only else (found if self.mode == "poll" else []):
            if name in found:
                self.follow(name, found[name])
        if self.mode == "poll":
            for v in list(self.table.versions.values()):
                gone = v.name not in problems and v.version not in found.get(v.name, {})
                if not gone:
                    self.gone.discard(v.key)  # its folder is back: it stays as any version does
                elif v.state == READY and self.successor(v) is not None:
                    self.gone.add(v.key)  # a rollback: it answers from memory until the version taking over is READY
                elif v.state in (LOADING, READY):
                    self.set(v, UNLOADING)
                elif v.state == UNAVAILABLE:
                    del self.table.versions[v.key]
                    self.dirty = True
        return found

    def successor(self, v: Version) -> Version | None:
        """The version loading to take over from `v`, whose folder left the repository: another of its model's
        versions that is LOADING (under latest, the newest that is left)."""
        loading = [o for o in self.table.versions.values() if o.name == v.name and o.state == LOADING]
        return max(loading, key=lambda o: o.version) if loading else None

    def retire_gone(self) -> None:
        """A version whose folder left stops being routed to once the version taking over is READY everywhere, or
        at once when none can (its successor failed to load): the rollback's swap, in the forward swap's order."""
        for key in sorted(self.gone):
            v = self.table.versions.get(key)
            if v is None or v.state != READY:
                self.gone.discard(key)
            elif self.successor(v) is None:
                self.gone.discard(key)
                self.set(v, UNLOADING)
                log.info("model %s version %d left the repository and is unloaded", v.name, v.version)

    def public(self, text: str) -> str:
        """`text` without this machine's folders: a path in the repository as REPO-relative, the repository (or the
        bundle served) by its name. The table's reasons reach clients (the index, /info, load answers)."""
        for root in {str(self.source.resolve()), str(self.source)}:
            text = text.replace(root + os.sep, "").replace(root, self.source.name)
        return text

    def log_problems(self, problems: dict[str, str]) -> None:
        """Each model folder the repository scan cannot use, logged once when it appears or changes (the index lists
        it meanwhile), and once when it is fixed: never on every poll."""
        for name, why in problems.items():
            if self.problems.get(name) != why:
                log.error("model repository: %s; what serves keeps serving", why)
        for name in set(self.problems) - set(problems):
            log.info("model repository: model folder %s is usable again", name)

    def follow(self, name: str, versions: dict[int, Path]) -> None:
        """Add the versions of `name` the policy wants and the table lacks (a version that failed or was rolled
        back stays UNAVAILABLE until its folder goes or its manifest changes)."""
        for version, path in wanted(versions, self.policy).items():
            held = self.table.versions.get(key_of(name, version))
            if held is not None and held.state == UNAVAILABLE and held.fingerprint != fingerprint(path):
                del self.table.versions[held.key]  # published again since: tried again
                held = None
            if held is not None and held.state == UNLOADING and not held.then:  # wanted again before it drained
                self.set(held, READY)
                self.since.pop(held.key, None)
            if held is not None:
                continue
            try:
                verify(path, self.backend)
            except ModelshipError as e:
                self.add(name, version, path, UNAVAILABLE, str(e))
                log.error("model %s version %d cannot be served: %s", name, version, e)
                continue
            self.add(name, version, path)
            log.info("model %s version %d found; loading it on every worker", name, version)

    # ------------------------------------------------------------------------------------------ requests

    def take(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        *who, body = frames
        request = json.loads(body)
        op, name = request.get("op"), request.get("name", "")
        if op in ("promote", "abort"):
            if name not in self.table.known and not any(v.name == name for v in self.table.versions.values()):
                reply(sock, who, 404, f"no model {name!r} in the model repository")
                return
            status, message = self.keeper.by_hand(self.table, op, name)
            if status == 200:
                self.write()  # the API servers route by the new table before the answer reaches the client
            reply(sock, who, status, message)
            return
        if op == "load":
            for v in [v for v in self.table.versions.values() if v.name == name and v.state == UNAVAILABLE]:
                del self.table.versions[v.key]  # asked again: a version that failed is tried again
            found = self.rescan(only=name)
            if name in self.table.problems:
                reply(sock, who, 400, self.table.problems[name])
                return
            if name not in found:
                reply(sock, who, 404, f"no model {name!r} in the model repository")
                return
            keys = [key_of(name, v) for v in wanted(found[name], self.policy)]
        else:
            keys = [v.key for v in self.table.versions.values() if v.name == name and v.state in HELD]
            if not keys:  # not loaded, or not in the repository: done already (Triton answers success too)
                reply(sock, who, 200)
                return
            for key in keys:
                self.set(self.table.versions[key], UNLOADING)
        self.waiting.append(Waiting(who, op, name, keys))

    def answer(self, sock: zmq.Socket) -> None:
        self.waiting = answer(sock, self.waiting, self.table)
