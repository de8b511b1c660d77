"""The model table: which model versions a server holds, in which state, shared by all of its processes.

The main process owns it (`modelship.serving.controller`) and writes it as one JSON file, replaced atomically, in the
server's private run folder; every inference worker and API server reads it when it changes:

- a worker loads every version the table lists as LOADING, READY or UNLOADING (and warms it up), unloads the others,
  and reports the table generation it has reached (and any version that failed to load) with its next request for
  work, so the controller knows when a version is loaded everywhere;
- an API server routes requests to READY versions only: a request without a version goes to the newest.

Versions: LOADING (being loaded on every worker; not routed), READY (routed), UNLOADING (no new requests; drained,
then removed), UNAVAILABLE (failed to load, or rolled back, with the reason; or in the repository and not loaded).
A model under a rollout (--rollout shadow|canary) has two READY versions, the serving one and the candidate, and its
`Rollout` says how requests without a version are shared between them (control.rollout). Standard library only, so
the API servers' hot path imports nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
RUNNING, PROMOTED, ROLLED_BACK, STOPPED = "running", "promoted", "rolled_back", "stopped"  # a rollout's states
HELD = (LOADING, READY, UNLOADING)  # the states whose versions the workers hold
TABLE = "models.json"
MANIFESTS = "manifests"  # a copy of each held version's manifest (keep_manifest)
START_FAILED = "start-failed.json"  # why a version asked for at start did not load: a worker writes it, serve reads it
REFRESH = 0.1  # seconds between an API server's or idle worker's looks at the table


def key_of(name: str, version: int) -> str:
    """A version's name on the transport and in the workers: name/version."""
    return f"{name}/{version}"


@dataclass
class Version:
    name: str
    version: int
    path: str  # the bundle's folder
    state: str
    reason: str = ""
    added: int = 0  # the table generation that asked for it: loaded once every worker has reached it
    resident_bytes: int = 0  # what loading it added to the workers' memory, summed over them
    fingerprint: str = ""  # its manifest's sha256 when added: a version that failed is tried again when it changes
    then: str = ""  # UNLOADING: the state once drained ("": it leaves the table; UNAVAILABLE: a rollback, kept)

    @property
    def key(self) -> str:
        return key_of(self.name, self.version)


@dataclass
class Rollout:
    """A model's rollout: its candidate version earns its traffic beside the serving one, then is promoted or rolled
    back (control.rollout decides; the catalog routes by it)."""

    name: str
    mode: str  # shadow: the candidate runs copies of `share` of the requests; canary: it answers `share` of them
    serving: int
    candidate: int
    share: float
    target: int  # compared requests that end it
    id: int  # the table generation that started it: where its tallies go
    started: float  # time.time()
    state: str = RUNNING
    reason: str = ""  # why it ended, in numbers; while running, why it waits for a hand (blocked)
    blocked: bool = False  # the versions cannot be compared (their inputs differ): no traffic until promote or abort
    ended: float = 0.0

    def routes(self) -> bool:
        """Requests without a version are shared between the two versions now."""
        return self.state == RUNNING and not self.blocked


@dataclass
class Table:
    generation: int = 0
    versions: dict[str, Version] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # model folders the repository scan could not use
    known: list[str] = field(default_factory=list)  # every model in the repository, loaded or not
    started: bool = False  # every version asked for at start has loaded or failed
    rollouts: dict[str, Rollout] = field(default_factory=dict)  # each model's current or last rollout

    def held(self) -> dict[str, Version]:
        return {k: v for k, v in self.versions.items() if v.state in HELD}

    def ready(self, name: str) -> list[Version]:
        """The READY versions of a model, newest first."""
        found = [v for v in self.versions.values() if v.name == name and v.state == READY]
        return sorted(found, key=lambda v: -v.version)

    def default(self, name: str) -> Version | None:
        """The version a request for `name` without a version goes to: the serving version of a rollout in
        progress, else the newest READY one."""
        r = self.rollouts.get(name)
        if r is not None and r.state == RUNNING:
            serving = self.versions.get(key_of(name, r.serving))
            if serving is not None and serving.state == READY:
                return serving
        ready = self.ready(name)
        return ready[0] if ready else None

    def names(self) -> list[str]:
        """Models with a READY version."""
        return sorted({v.name for v in self.versions.values() if v.state == READY})

    def to_json(self) -> str:
        doc = asdict(self)
        doc["versions"] = list(doc["versions"].values())
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> Table:
        doc = json.loads(text)
        versions = {key_of(v["name"], v["version"]): Version(**v) for v in doc.pop("versions")}
        rollouts = {name: Rollout(**r) for name, r in doc.pop("rollouts", {}).items()}
        return cls(versions=versions, rollouts=rollouts, **doc)

    def write(self, folder: str) -> None:
        """Replace the table file in one rename: a reader sees the old table or the new one, never half."""
        tmp = os.path.join(folder, f".{TABLE}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, os.path.join(folder, TABLE))


class Reader:
    """A process's view of the table: `current()` re-reads the file when it changed, at most every REFRESH seconds."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, TABLE)
        self.table = Table()
        self.stamp: tuple[int, int] | None = None
        self.checked = 0.0

    def current(self) -> Table:
        self.poll()
        return self.table

    def poll(self) -> bool:
        """Re-read the table if REFRESH seconds passed since the last look and it changed; whether it did."""
        now = time.monotonic()
        if now - self.checked < REFRESH:
            return False
        self.checked = now
        return self.reload()

    def reload(self) -> bool:
        """Read the file if it changed since the last read; whether it had."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)  # a rename gives a new inode even within one mtime tick
        if stamp == self.stamp:
            return False
        with open(self.path) as f:
            self.table = Table.from_json(f.read())
        self.stamp = stamp
        return True


def index(table: Table, ready_only: bool = False) -> list[dict[str, Any]]:
    """The repository index as Triton answers POST /v2/repository/index: every model, with its versions' states
    (only the READY versions with `ready_only`, Triton's {"ready": true})."""
    rows = [
        {
            "name": v.name,
            "version": str(v.version),
            "state": v.state,
            "reason": v.reason,
            "resident_bytes": v.resident_bytes,
        }
        for v in table.versions.values()
    ]
    if ready_only:
        return sorted((r for r in rows if r["state"] == READY), key=lambda r: (r["name"], int(r["version"])))
    listed = {v.name for v in table.versions.values()}
    rows += [{"name": n, "version": "", "state": UNAVAILABLE, "reason": why} for n, why in table.problems.items()]
    listed |= set(table.problems)
    rows += [
        {"name": n, "version": "", "state": UNAVAILABLE, "reason": "unloaded"} for n in table.known if n not in listed
    ]
    return sorted(rows, key=lambda r: (r["name"], int(r["version"] or 0)))


def keep_manifest(folder: str, key: str, bundle: str) -> None:
    """Keep a copy of a version's manifest (just checked) in the run folder, for the API servers: a version whose
    folder leaves the repository still answers from memory until another takes over (a poll rollback)."""
    os.makedirs(os.path.join(folder, MANIFESTS), exist_ok=True)
    path = _kept(folder, key)
    shutil.copyfile(os.path.join(bundle, "manifest.json"), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def kept_manifest(folder: str, key: str) -> dict[str, Any]:
    """The manifest `keep_manifest` kept for a version."""
    with open(_kept(folder, key)) as f:
        manifest: dict[str, Any] = json.load(f)
    return manifest


def drop_manifest(folder: str, key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_kept(folder, key))


def _kept(folder: str, key: str) -> str:
    return os.path.join(folder, MANIFESTS, key.replace("/", "@") + ".json")  # a model name never holds "@"


def record_start_failure(folder: str, failed: dict[str, str], artifacts: list[str]) -> None:
    """A worker's versions that failed to load at start, for the main process's one-line error: {key: reason}, and
    which of them are artifacts their runtime refused (a bundle to fix) rather than a failure of the server."""
    tmp = os.path.join(folder, f".{START_FAILED}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"failed": failed, "artifacts": artifacts}, f)
    os.replace(tmp, os.path.join(folder, START_FAILED))


def start_failure(folder: str) -> tuple[dict[str, str], list[str]]:
    """What `record_start_failure` wrote last: ({key: reason}, artifact keys); empty when nothing was."""
    try:
        with open(os.path.join(folder, START_FAILED)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}, []
    return dict(doc.get("failed", {})), list(doc.get("artifacts", []))


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere), in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
