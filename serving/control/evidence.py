"""The evidence a rollout is decided on (control.rollout): each API server's `Tally` of the requests both versions
ran (outcomes, end-to-end latency, top-1 agreement), each inference worker's `ServiceTimes` (how long each version's
batches ran, queueing excluded), the controller's sums of them (`merged`, `service`), and the checks (`checks`).

Latency is judged on service time, not end to end: the two versions share the workers, so a slow candidate's batches
hold up the serving version's requests too, and both end-to-end p99s rise together (a candidate 50x slower in
compute measured 1.2-1.6x the serving version's end-to-end p99 under load). The end-to-end p99s are reported beside."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelship.files import read_json, replace_json
from modelship.serving.control.table import Rollout

FOLDER = "rollouts"
ROLES = ("serving", "candidate")
COPIES = 16  # copies an API server has in flight at most; more are dropped (counted): the server is overloaded
FLUSH = 0.25  # seconds between an API server's writes of its tallies
ERROR_MARGIN = 0.01  # the candidate's error rate may exceed the serving version's by this much
LATENCY_FACTOR, LATENCY_SLACK = 2.0, 0.002  # its p99 service time within 2x the serving version's, plus 2 ms
SERVICE_EVERY = 0.5  # seconds between a worker's writes of its service times
EARLY_Z, EARLY_MIN = 3.29, 20  # a check failing at 99.9% confidence (Wilson) after 20 samples ends it early
BUCKET0, GROWTH, BUCKETS = 1e-4, 1.1, 160  # latency histograms: 0.1 ms to ~400 s, 10% wide buckets
DRIFT_RANK = {"ok": 0, "warn": 1, "drift": 2}


@dataclass(frozen=True)
class Policy:
    """How this server rolls out (ServeConfig's flags)."""

    mode: str = "none"
    shadow_sample: float = 1.0
    canary_percent: float = 10.0
    requests: int = 1000
    min_agreement: float = 0.9
    drift: bool = True  # live drift is on: its status is a check

    @property
    def share(self) -> float:
        return self.shadow_sample if self.mode == "shadow" else self.canary_percent / 100


def bucket(seconds: float) -> int:
    return min(BUCKETS - 1, max(0, int(math.log(max(seconds, BUCKET0) / BUCKET0, GROWTH))))


def empty(rollout: Rollout) -> dict[str, Any]:
    return {
        "name": rollout.name,
        "candidate": rollout.candidate,
        "requests": dict.fromkeys(ROLES, 0),
        "errors": dict.fromkeys(ROLES, 0),
        "latency": {role: [0] * BUCKETS for role in ROLES},
        "routed": 0,  # requests without a version while it ran: the canary's share is of these
        "compared": 0,  # requests both versions ran
        "samples": 0,  # rows both answered, and of them those whose top-1 labels agreed
        "agreed": 0,
        "dropped": 0,  # copies not run: the server was overloaded
    }


class Tally:
    """An API server's counts of the rollouts it routes, by rollout; written to the run folder every FLUSH seconds
    by its event loop (the controller sums every process's)."""

    def __init__(self, run_dir: str) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.counts: dict[int, dict[str, Any]] = {}
        self.changed: set[int] = set()
        self.inflight = 0  # copies running now

    def of(self, rollout: Rollout) -> dict[str, Any]:
        counts = self.counts.get(rollout.id)
        if counts is None:
            if len(self.counts) > 64:  # rollouts come and go for the life of the server
                self.counts = {k: v for k, v in self.counts.items() if k in self.changed}
            counts = self.counts[rollout.id] = empty(rollout)
        self.touch(rollout.id)
        return counts

    def routed(self, rollout: Rollout) -> None:
        self.of(rollout)["routed"] += 1

    def answered(self, rollout: Rollout, role: str, ok: bool, seconds: float) -> None:
        """A request both versions ran, as the version in `role` ran it (the answer, or the copy): its outcome and
        end-to-end latency."""
        c = self.of(rollout)
        c["requests"][role] += 1
        c["errors"][role] += not ok
        c["latency"][role][bucket(seconds)] += 1

    def pair(self, rollout: Rollout, labels: tuple[list[str], list[str]] | None) -> None:
        """A request both versions ran: their top-1 labels, row by row, when both answered."""
        c = self.of(rollout)
        c["compared"] += 1
        if labels is not None:
            c["samples"] += len(labels[0])
            c["agreed"] += sum(a == b for a, b in zip(*labels, strict=True))

    def drop(self, rollout: Rollout) -> None:
        self.of(rollout)["dropped"] += 1

    def touch(self, rollout_id: int) -> None:
        if not self.changed:
            import asyncio

            with contextlib.suppress(RuntimeError):  # no loop: flushed by the next change made inside one
                asyncio.get_running_loop().call_later(FLUSH, self.flush)
        self.changed.add(rollout_id)

    def flush(self) -> None:
        """Write the counts that changed, each in one rename (the controller reads them whole)."""
        changed, self.changed = self.changed, set()
        for rollout_id in changed:
            replace_json(self.folder / str(rollout_id) / f"{os.getpid()}.json", self.counts[rollout_id])


class ServiceTimes:
    """An inference worker's service times by model version: each request counted in the bucket of its batch's run
    (queueing excluded), since the process started; written every SERVICE_EVERY seconds when they changed, from the
    worker's loop after a batch's answers have gone."""

    def __init__(self, run_dir: str) -> None:
        self.folder = Path(run_dir) / FOLDER / "service"
        self.histograms: dict[str, list[int]] = {}
        self.changed: set[str] = set()
        self.written = 0.0

    def add(self, key: str, seconds: float, requests: int) -> None:
        self.histograms.setdefault(key, [0] * BUCKETS)[bucket(seconds)] += requests
        self.changed.add(key)

    def flush(self) -> None:
        if not self.changed or time.monotonic() - self.written < SERVICE_EVERY:
            return
        for key in self.changed:
            replace_json(self.folder / key.replace("/", "@") / f"{os.getpid()}.json", self.histograms[key])
        self.changed.clear()
        self.written = time.monotonic()


def service(run_dir: str, key: str) -> list[int]:
    """Every worker's service times of version `key`, summed (a worker that died keeps its last counts)."""
    total = [0] * BUCKETS
    folder = Path(run_dir) / FOLDER / "service" / key.replace("/", "@")
    for path in sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []:
        counts = read_json(path)
        if isinstance(counts, list) and len(counts) == BUCKETS:  # else torn or foreign: skipped, as before
            total = [a + b for a, b in zip(total, counts, strict=True)]
    return total


def merged(run_dir: str, rollout: Rollout) -> dict[str, Any]:
    """Every API server's counts of a rollout, summed."""
    total = empty(rollout)
    folder = Path(run_dir) / FOLDER / str(rollout.id)
    for path in sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []:
        c = read_json(path)
        if c is None:
            continue
        for key in ("routed", "compared", "samples", "agreed", "dropped"):
            total[key] += c.get(key, 0)
        for role in ROLES:
            total["requests"][role] += c["requests"][role]
            total["errors"][role] += c["errors"][role]
            total["latency"][role] = [a + b for a, b in zip(total["latency"][role], c["latency"][role], strict=True)]
    return total


# ---------------------------------------------------------------------------------------------- the checks


def p99(histogram: list[int]) -> float | None:
    """The 99th percentile latency (the upper edge of its bucket), seconds; None with no requests."""
    n = sum(histogram)
    if not n:
        return None
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= 0.99 * n:
            return BUCKET0 * GROWTH ** (i + 1)
    return None  # unreachable


def wilson(hits: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a share of `hits` in `n`."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def checks(c: dict[str, Any], policy: Policy, drift: tuple[str, str] | None, serving: int) -> list[dict[str, Any]]:
    """Each check's value against its limit: `passed` True or False on the evidence so far, None with none yet;
    `early` when it fails beyond doubt before the target. `drift` is (candidate's status, serving's) or None."""
    found = []
    n, agreed = c["samples"], c["agreed"]
    agreement = agreed / n if n else None
    found.append({
        "check": "agreement", "value": agreement, "limit": policy.min_agreement,
        "passed": None if agreement is None else agreement >= policy.min_agreement,
        "early": n >= EARLY_MIN and wilson(agreed, n, EARLY_Z)[1] < policy.min_agreement,
        "text": f"top-1 agreement {agreement or 0:.3f} {'>=' if (agreement or 0) >= policy.min_agreement else '<'} "
                f"{policy.min_agreement:g} ({agreed} of {n} answers)",
    })  # fmt: skip
    req, err = c["requests"], c["errors"]
    rate = {role: err[role] / req[role] if req[role] else 0.0 for role in ROLES}
    limit = rate["serving"] + ERROR_MARGIN
    found.append({
        "check": "errors", "value": rate["candidate"], "serving": rate["serving"], "limit": limit,
        "passed": None if not req["candidate"] else rate["candidate"] <= limit,
        "early": req["candidate"] >= EARLY_MIN and wilson(err["candidate"], req["candidate"], EARLY_Z)[0] > limit,
        "text": f"error rate {rate['candidate']:.3f} {'<=' if rate['candidate'] <= limit else '>'} "
                f"{rate['serving']:.3f} (version {serving}'s) + {ERROR_MARGIN:g}",
    })  # fmt: skip
    times = c.get("service", {})
    mine, theirs = p99(times.get("candidate", [])), p99(times.get("serving", []))
    if mine is not None and theirs is not None:
        bound = LATENCY_FACTOR * theirs + LATENCY_SLACK
        found.append({
            "check": "latency", "value": mine, "serving": theirs, "limit": bound, "passed": mine <= bound,
            "early": False, "end_to_end": {role: p99(c["latency"][role]) for role in ROLES},
            "text": f"p99 service time {1000 * mine:.1f} ms {'<=' if mine <= bound else '>'} {LATENCY_FACTOR:g} x "
                    f"{1000 * theirs:.1f} ms (version {serving}'s) + {1000 * LATENCY_SLACK:g} ms",
        })  # fmt: skip
    if drift is not None:
        mine_s, theirs_s = drift
        judged = mine_s in DRIFT_RANK and theirs_s in DRIFT_RANK
        ok = not judged or DRIFT_RANK[mine_s] <= DRIFT_RANK[theirs_s]
        found.append({
            "check": "drift", "value": mine_s, "serving": theirs_s, "passed": ok if judged else None, "early": False,
            "text": f"drift status {mine_s} {'no worse than' if ok else 'worse than'} version {serving}'s {theirs_s}"
                    if judged else f"drift status {mine_s}, version {serving}'s {theirs_s}: not judged yet",
        })  # fmt: skip
    return found
