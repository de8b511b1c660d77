"""Rollouts (`--rollout shadow|canary`): a model's new version earns its traffic beside the serving one, then is
promoted or rolled back on the evidence, in three places:

- the catalog (each API server) shares a model's requests without a version by its `Rollout` in the model table:
  in shadow every request goes to the serving version and a sampled share is copied to the candidate; in canary the
  candidate answers a share (sticky by the X-Canary-Key header when a client sends one) and the serving version
  runs a copy of those, so top-1 agreement is measured in both modes;
- the data plane (each API server) runs the copy off the answer path and counts both sides in its `Tally`
  (control.evidence), written every FLUSH seconds to RUN_DIR/rollouts/<id>/<pid>.json;
- the controller (main process) sums the tallies every LOOK seconds (`Keeper`), works out the checks and ends the
  rollout: promoted once the target of compared requests is reached and every check holds; rolled back as soon as
  one fails (at the target, or before it when it fails beyond doubt: `EARLY_Z`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelship.files import read_json, replace_json
from modelship.serving.control.evidence import FOLDER, ROLES, Policy, checks, empty, merged, service
from modelship.serving.control.table import (
    PROMOTED,
    READY,
    ROLLED_BACK,
    RUNNING,
    STOPPED,
    UNAVAILABLE,
    UNLOADING,
    Rollout,
    Table,
    Version,
    key_of,
)

log = logging.getLogger(__name__)

LOOK = 0.25  # seconds between the controller's looks at a rollout


# ---------------------------------------------------------------------------------------------- the controller


def document_path(run_dir: str, name: str) -> Path:
    return Path(run_dir) / FOLDER / f"{name}.json"


def read_document(run_dir: str, name: str) -> dict[str, Any] | None:
    """The controller's last look at a model's rollout, or None."""
    doc = read_json(document_path(run_dir, name))
    return None if doc is None else dict(doc)


def inputs_differ(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Why two versions' manifests cannot be compared on the same requests, or "". Their normalization may differ
    (a copy is renormalized for its version: catalog.bridge); the tensor they take may not."""
    pa, pb = a["preprocess"], b["preprocess"]
    for what, x, y in (("input", a["input"], b["input"]), ("input size", pa["size"], pb["size"]),
                       ("channels", pa["channels"], pb["channels"])):  # fmt: skip
        if x != y:
            return f"their {what} differs ({x} against {y})"
    return ""


class Keeper:
    """The controller's side: starts a model's rollout when a newer version turns READY beside the serving one,
    looks at it every LOOK seconds, and ends it (the controller's `set` changes the versions' states)."""

    def __init__(self, run_dir: str, policy: Policy, set_state: Callable[..., None],
                 manifest: Callable[[str], dict[str, Any]]) -> None:  # fmt: skip
        self.run_dir, self.policy, self.set_state, self.manifest = run_dir, policy, set_state, manifest
        self.looked: dict[str, float] = {}
        self.base: dict[int, dict[str, list[int]]] = {}  # each rollout's service times at its start, by role

    def step(self, table: Table, gone: set[str], now: float) -> bool:
        """Start, look at and end the rollouts; whether the table changed."""
        changed = False
        for name in table.names():
            ready = [v for v in table.ready(name) if v.key not in gone]
            r = table.rollouts.get(name)
            if r is not None and r.state == RUNNING:
                changed |= self.follow(table, r, ready, now)
            elif self.policy.mode != "none" and table.started and len(ready) >= 2:
                if r is not None and r.state == PROMOTED and r.candidate == ready[0].version:
                    continue  # promoted by hand a moment ago: the version it replaces is about to drain
                self.begin(table, name, ready[1], ready[0])
                changed = True
        return changed

    def begin(self, table: Table, name: str, serving: Version, candidate: Version) -> None:
        p = self.policy
        r = Rollout(name, p.mode, serving.version, candidate.version, p.share, p.requests, table.generation + 1,
                    time.time())  # fmt: skip
        differ = inputs_differ(self.manifest(serving.key), self.manifest(candidate.key))
        if differ:
            r.blocked = True
            r.reason = f"versions {r.serving} and {r.candidate} cannot be compared: {differ}; promote or abort by hand"
            log.warning("model %s: %s", name, r.reason)
        else:
            what = f"answers {100 * r.share:g}% of" if r.mode == "canary" else f"runs a copy of {100 * r.share:g}% of"
            log.info("model %s: version %d %s the requests beside version %d (%s) until %d are compared",
                     name, r.candidate, what, r.serving, r.mode, r.target)  # fmt: skip
        table.rollouts[name] = r
        self.base[r.id] = {role: service(self.run_dir, key_of(name, v)) for role, v in self.versions(r).items()}
        self.write(r, empty(r), [])

    @staticmethod
    def versions(r: Rollout) -> dict[str, int]:
        return {"serving": r.serving, "candidate": r.candidate}

    def evidence(self, r: Rollout) -> dict[str, Any]:
        """The API servers' tallies of a rollout, summed, with each version's service times since it started."""
        c = merged(self.run_dir, r)
        base = self.base.get(r.id, {})
        c["service"] = {}
        for role, v in self.versions(r).items():
            now, then = service(self.run_dir, key_of(r.name, v)), base.get(role)
            c["service"][role] = [a - b for a, b in zip(now, then, strict=True)] if then else now
        return c

    def follow(self, table: Table, r: Rollout, ready: list[Version], now: float) -> bool:
        """A running rollout: stopped when a version left or a newer one came, else looked at and maybe ended."""
        versions = [v.version for v in ready]
        stop = next((f"version {v} left: it was unloaded, or its folder removed" for v in (r.serving, r.candidate)
                     if v not in versions), "")  # fmt: skip
        if versions and versions[0] > r.candidate:
            stop = f"version {versions[0]} came before it ended"
        if stop:
            self.end(r, STOPPED, stop)
            self.write(r, self.evidence(r), [])
            return True
        if r.blocked or now - self.looked.get(r.name, 0.0) < LOOK:
            return False
        self.looked[r.name] = now
        c = self.evidence(r)
        found = checks(c, self.policy, self.drift(r), r.serving)
        self.write(r, c, found)
        failed = [f for f in found if f["passed"] is False and (f["early"] or c["compared"] >= r.target)]
        if failed:
            self.roll_back(table, r, "; ".join(f["text"] for f in failed) + self.over(r, c))
        elif c["compared"] >= r.target:
            self.end(r, PROMOTED, "; ".join(f["text"] for f in found) + self.over(r, c))
        else:
            return False
        self.write(r, c, found)
        return True

    def over(self, r: Rollout, c: dict[str, Any]) -> str:
        return f" over {c['compared']} {'shadowed' if r.mode == 'shadow' else 'canary'} requests"

    def drift(self, r: Rollout) -> tuple[str, str] | None:
        if not self.policy.drift:
            return None
        from modelship.serving.monitoring.drift import read_document as drift_document

        docs = [drift_document(self.run_dir, key_of(r.name, v)) for v in (r.candidate, r.serving)]
        mine, theirs = (str(d["status"]) if d else "collecting" for d in docs)
        return mine, theirs

    def by_hand(self, table: Table, op: str, name: str) -> tuple[int, str]:
        """POST .../promote or .../abort: (HTTP status, the outcome or why not)."""
        r = table.rollouts.get(name)
        if r is None or r.state != RUNNING:
            last = f" (the last one {r.reason})" if r is not None else ""
            return 409, f"model {name!r} has no rollout in progress{last}"
        c = self.evidence(r)
        at = f"at {c['compared']} of {r.target} compared requests"
        if op == "promote":
            self.end(r, PROMOTED, f"by hand {at}")
        else:
            self.roll_back(table, r, f"aborted by hand {at}")
        self.write(r, c, checks(c, self.policy, self.drift(r), r.serving))
        return 200, json.dumps({"model": name, "state": r.state, "reason": r.reason})

    def roll_back(self, table: Table, r: Rollout, why: str) -> None:
        """The candidate drains and unloads, and stays UNAVAILABLE with the reason: not tried again until its
        manifest changes or it is loaded by request."""
        self.end(r, ROLLED_BACK, why)
        candidate = table.versions.get(key_of(r.name, r.candidate))
        if candidate is not None and candidate.state == READY:
            self.set_state(candidate, UNLOADING, r.reason)
            candidate.then = UNAVAILABLE

    @staticmethod
    def end(r: Rollout, state: str, why: str) -> None:
        r.state, r.ended, r.reason = state, time.time(), f"{state.replace('_', ' ')}: {why}"
        log.info("model %s version %d: %s", r.name, r.candidate, r.reason)

    def write(self, r: Rollout, c: dict[str, Any], found: list[dict[str, Any]]) -> None:
        """The rollout's document (GET /v2/models/{name}/rollout) and its gauges."""
        doc = document(r, c, found)
        replace_json(document_path(self.run_dir, r.name), doc)
        gauges(doc)


def document(r: Rollout, c: dict[str, Any], found: list[dict[str, Any]]) -> dict[str, Any]:
    req = c["requests"]
    return {
        "model": r.name,
        "mode": r.mode,
        "state": r.state,
        "serving": str(r.serving),
        "candidate": str(r.candidate),
        "share": r.share,
        "target": r.target,
        "blocked": r.blocked,
        "reason": r.reason,
        "started": r.started,
        "ended": r.ended or None,
        "seconds": (r.ended or time.time()) - r.started,
        "requests": {
            "compared": c["compared"],
            "dropped": c["dropped"],
            "serving": req["serving"],
            "candidate": req["candidate"],
            "routed": c["routed"],
            "candidate_share": req["candidate"] / c["routed"] if c["routed"] and r.mode == "canary" else None,
            "errors": c["errors"],
        },
        "checks": {f["check"]: {k: v for k, v in f.items() if k not in ("check", "early")} for f in found},
    }


STATE_VALUE = {RUNNING: 0, PROMOTED: 1, ROLLED_BACK: -1, STOPPED: -2}  # the state gauge's value


def gauges(doc: dict[str, Any]) -> None:
    from modelship.serving.metrics import metrics

    m, name = metrics(), doc["model"]
    m.rollout_state.labels(name, doc["candidate"]).set(STATE_VALUE[doc["state"]])
    m.rollout_compared.labels(name, doc["candidate"]).set(doc["requests"]["compared"])
    m.rollout_dropped.labels(name, doc["candidate"]).set(doc["requests"]["dropped"])
    agreement = doc["checks"].get("agreement", {}).get("value")
    if agreement is not None:
        m.rollout_agreement.labels(name, doc["candidate"]).set(agreement)
    for role in ROLES:
        version = doc[role]
        m.rollout_requests.labels(name, version, role).set(doc["requests"][role])
        m.rollout_errors.labels(name, version, role).set(doc["requests"]["errors"][role])
    latency = doc["checks"].get("latency")
    if latency is not None:
        m.rollout_p99.labels(name, doc["candidate"], "candidate").set(latency["value"])
        m.rollout_p99.labels(name, doc["serving"], "serving").set(latency["serving"])
