"""Rollouts (`serve REPO --rollout shadow|canary`) on real servers under load: a new version earns its traffic, then
is promoted or rolled back on the evidence, with no failed request.

The versions are affine models whose answers show which version gave them: version 1 is 2x + 1; `good` is 3x (the
same top-1 class, other logits: a retrained model that agrees); `permuted` is 2x + 1 with its class names in another
order (every top-1 label differs: a version that is fast, error-free and wrong); `slow` is 2x + 1 behind a pile of
matrix products (right, and about fifty times slower); `renormalized` is 3x exported with another mean and std (a
retraining that measured its own normalization on its own data, as every `modelship run` does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modelship.preprocess import Preprocess, preprocess_image
from modelship.serving.control.catalog import Pairing, bridge
from modelship.serving.control.evidence import checks, p99, wilson
from modelship.serving.control.rollout import inputs_differ
from modelship.serving.control.table import Rollout
from tests.conftest import affine_3x, export_affine
from tests.helpers import Server, running_server, scrape

POLL = ("--model-control", "poll", "--poll-interval", "0.3")


@pytest.fixture(scope="module")
def permuted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import affine_identity

    return export_affine(tmp_path_factory.mktemp("permuted"), affine_identity(4), classes="b,a,d,c")


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import slow_affine

    return export_affine(tmp_path_factory.mktemp("slow"), slow_affine(4), factory="slow_affine")


@pytest.fixture(scope="module")
def renormalized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("renormalized")
    return export_affine(d, affine_3x(), formats=("--formats", "onnx", "--mean", "0.25", "--std", "0.5"))


def publish(bundle: Path, repo: Path, version: int) -> None:
    """A version into the repository in one rename, as `--publish` does (replacing what was there)."""
    incoming = repo / "affine" / f".incoming-{version}"
    shutil.copytree(bundle, incoming)
    target = repo / "affine" / str(version)
    if target.exists():
        shutil.rmtree(target)
    incoming.rename(target)


@dataclass
class Load:
    """Client threads sending v2 requests without a version, each with two random inputs: every answer's version
    and time, and every failure (none is expected)."""

    url: str
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = np.random.default_rng()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                x = rng.random((2, 4), dtype=np.float32)
                body = {"inputs": [{"name": "input", "shape": [2, 1, 2, 2], "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}  # fmt: skip
                try:
                    r = client.post("/v2/models/affine/infer", json=body)
                    version = r.json()["model_version"] if r.status_code == 200 else None
                    if version is None:
                        self.failures.append(f"{r.status_code} {r.text}")
                        continue
                    self.answers.append((time.monotonic(), version))
                    want = 3 * x if version == "3" else 2 * x + 1  # version 2 is replaced in place by one test
                    if version != "2" and not np.allclose(r.json()["outputs"][0]["data"], want.ravel(), atol=1e-5):
                        self.failures.append(f"version {version} answered {r.json()['outputs'][0]['data']}")
                except Exception as e:  # every failure counts: none is expected
                    self.failures.append(repr(e))

    def versions(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        seen: dict[str, int] = {}
        for t, v in list(self.answers):
            if since <= t <= until:
                seen[v] = seen.get(v, 0) + 1
        return seen


@contextlib.contextmanager
def under_load(url: str, clients: int = 3) -> Iterator[Load]:
    load = Load(url)
    threads = [threading.Thread(target=load.run) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        load.stop.set()
        for t in threads:
            t.join()


def rollout(url: str) -> dict:
    return httpx.get(url + "/v2/models/affine/rollout").json()


def until(url: str, state: str, candidate: str, timeout: float = 60.0) -> dict:
    """The rollout document once the rollout of `candidate` is in `state`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = rollout(url)
        if doc.get("candidate") == candidate and doc["state"] == state:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"no {state} rollout of version {candidate} in {timeout}s: {doc}")


def index(url: str) -> dict[str, dict]:
    return {row["version"]: row for row in httpx.post(url + "/v2/repository/index").json()}


def row_once(url: str, version: str, state: str, timeout: float = 10.0) -> dict:
    """The repository index's row of `version` once it is in `state` (a rolled-back version drains first)."""
    deadline = time.monotonic() + timeout
    while (row := index(url).get(version, {})).get("state") != state and time.monotonic() < deadline:
        time.sleep(0.05)
    return row


def test_shadow_rolls_back_a_wrong_version_unseen_and_promotes_a_good_one(
    tmp_path: Path, affine_bundle: Path, affine_v2: Path, permuted: Path
) -> None:
    repo = tmp_path / "repo"
    publish(affine_bundle, repo, 1)
    args = ("--rollout", "shadow", "--rollout-requests", "150")
    with running_server(repo, *POLL, *args, tmp=tmp_path) as s, under_load(s.url) as load:
        time.sleep(0.5)
        publish(permuted, repo, 2)
        doc = until(s.url, "rolled_back", "2")
        assert load.versions() == {"1": len(load.answers)}  # in shadow the candidate answered no client
        assert doc["reason"].startswith("rolled back: top-1 agreement 0.000 < 0.9")
        assert doc["checks"]["agreement"]["value"] == 0.0 and doc["requests"]["compared"] >= 20
        row = row_once(s.url, "2", "UNAVAILABLE")
        assert row["state"] == "UNAVAILABLE" and row["reason"] == doc["reason"]
        assert scrape(s.url)['modelship_rollout_state{model="affine",version="2"}'] == -1
        time.sleep(1.5)  # five polls: a rolled-back version is not tried again while it stays as it is
        assert rollout(s.url)["started"] == doc["started"] and index(s.url)["2"]["state"] == "UNAVAILABLE"

        publish(affine_v2, repo, 2)  # changed in place: tried again
        doc = until(s.url, "promoted", "2")
        promoted_at = time.monotonic()
        assert doc["requests"]["compared"] >= 150 and doc["checks"]["agreement"]["value"] == 1.0
        assert all(doc["checks"][c]["passed"] for c in ("agreement", "errors", "latency"))
        assert doc["reason"].startswith("promoted: top-1 agreement 1.000 >= 0.9")
        time.sleep(1.0)
    assert load.failures == []
    assert load.versions(since=promoted_at + 0.5) == {"2": load.versions(since=promoted_at + 0.5)["2"]}


def test_canary_answers_its_share_rolls_back_a_slow_version_and_promotes_a_good_one(
    tmp_path: Path, affine_bundle: Path, renormalized: Path, slow: Path
) -> None:
    repo = tmp_path / "repo"
    publish(affine_bundle, repo, 1)
    args = ("--rollout", "canary", "--canary-percent", "20", "--rollout-requests", "150")
    with running_server(repo, *POLL, *args, tmp=tmp_path) as s, under_load(s.url) as load:
        time.sleep(0.5)
        publish(slow, repo, 2)
        running = until(s.url, "running", "2")
        began = time.monotonic()
        doc = until(s.url, "rolled_back", "2")
        seen = load.versions(since=began, until=time.monotonic() - 0.3)  # (routing follows the table within 0.1 s)
        share = seen.get("2", 0) / sum(seen.values())
        assert abs(share - 0.2) < 0.06 and abs(doc["requests"]["candidate_share"] - 0.2) < 0.06, (share, doc)
        assert "p99 service time" in doc["reason"] and doc["checks"]["latency"]["passed"] is False
        latency = doc["checks"]["latency"]
        assert latency["value"] > 10 * latency["serving"], latency
        assert running["share"] == 0.2 and row_once(s.url, "2", "UNAVAILABLE")["state"] == "UNAVAILABLE"

        publish(renormalized, repo, 3)  # its own mean and std: compared all the same (each copy renormalized)
        assert not until(s.url, "running", "3")["blocked"]
        sticky = [infer(s.url, {"X-Canary-Key": "customer-42"}) for _ in range(12)]
        assert len(set(sticky)) == 1, sticky  # one key, one side of the canary
        doc = until(s.url, "promoted", "3")
        assert doc["checks"]["agreement"]["value"] == 1.0 and doc["requests"]["errors"]["candidate"] == 0
        time.sleep(1.0)
    assert load.failures == []
    assert load.versions()["3"] > 0


def infer(url: str, headers: dict[str, str]) -> str:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}]}
    r = httpx.post(url + "/v2/models/affine/infer", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def test_a_worker_killed_mid_rollout_loses_nothing_and_the_rollout_carries_on(
    tmp_path: Path, affine_bundle: Path, affine_v2: Path
) -> None:
    repo = tmp_path / "repo"
    publish(affine_bundle, repo, 1)
    args = ("--rollout", "shadow", "--rollout-requests", "600")
    with running_server(repo, *POLL, *args, tmp=tmp_path) as s, under_load(s.url) as load:
        publish(affine_v2, repo, 2)
        deadline = time.monotonic() + 30
        while rollout(s.url).get("requests", {}).get("compared", 0) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = rollout(s.url)
        assert before["state"] == "running", before
        os.kill(s.children()[0], signal.SIGKILL)
        doc = until(s.url, "promoted", "2")
        assert doc["started"] == before["started"] and doc["requests"]["compared"] >= 600
    assert load.failures == []


def test_promote_and_abort_by_hand_and_their_mistakes(tmp_path: Path, affine_bundle: Path, affine_v2: Path,
                                                      permuted: Path) -> None:  # fmt: skip
    repo = tmp_path / "repo"
    publish(affine_bundle, repo, 1)
    args = ("--model-control", "explicit", "--load-model", "affine", "--rollout", "shadow")
    with running_server(repo, *args, "--rollout-requests", "1000000", tmp=tmp_path) as s:

        def post(path: str) -> httpx.Response:
            return httpx.post(f"{s.url}/v2/repository/models/{path}", timeout=60)

        r = post("affine/promote")
        assert r.status_code == 409 and r.json()["error"] == "model 'affine' has no rollout in progress"
        assert post("nope/abort").status_code == 404
        publish(affine_v2, repo, 2)
        assert post("affine/load").status_code == 200  # loaded beside version 1: the rollout starts
        assert until(s.url, "running", "2")["serving"] == "1"
        assert infer(s.url, {}) == "1"
        r = post("affine/promote")
        assert r.status_code == 200 and r.json()["state"] == "promoted", r.text
        assert r.json()["reason"].startswith("promoted: by hand at ") and infer(s.url, {}) == "2"
        r = post("affine/promote")
        assert r.status_code == 409 and "(the last one promoted: by hand at 0 of 1000000" in r.json()["error"]

        publish(permuted, repo, 3)
        assert post("affine/load").status_code == 200
        first = until(s.url, "running", "3")
        r = post("affine/abort")
        assert r.status_code == 200 and r.json()["state"] == "rolled_back"
        assert infer(s.url, {}) == "2"
        assert row_once(s.url, "3", "UNAVAILABLE")["reason"].startswith("rolled back: aborted by hand at ")
        assert post("affine/load").status_code == 200  # loaded by request: tried again
        assert until(s.url, "running", "3")["started"] > first["started"]


def test_a_server_without_rollouts_says_so(server: Server) -> None:
    r = httpx.post(server.url + "/v2/repository/models/shapes-cnn/promote")
    assert r.status_code == 409 and "--rollout none" in r.json()["error"]
    doc = httpx.get(server.url + "/v2/models/shapes-cnn/rollout").json()
    assert (doc["mode"], doc["state"]) == ("none", "off")
    assert httpx.get(server.url + "/v2/models/nope/rollout").status_code == 404


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--rollout", "shadow", "--version-policy", "all", *POLL), "--version-policy all serves every version"),
        (("--rollout", "canary"), "add --model-control poll (or explicit)"),
        (("--rollout", "canary", "--canary-percent", "100", *POLL), "--canary-percent must be above 0 and below 100"),
        (("--rollout", "shadow", "--canary-percent", "20", *POLL), "--canary-percent goes with --rollout canary"),
        (("--rollout", "shadow", "--shadow-sample", "0", *POLL), "--shadow-sample must be above 0 and at most 1"),
        (("--rollout", "shadow", "--min-agreement", "1.5", *POLL), "--min-agreement must be 0 to 1, got 1.5"),
        (("--rollout", "shadow", "--rollout-requests", "0", *POLL), "--rollout-requests must be 1 to 10000000"),
        (("--rollout", "blue-green", *POLL), "invalid choice: 'blue-green'"),
    ],
)
def test_rollout_flags_are_checked(tmp_path: Path, affine_bundle: Path, cli, args: tuple[str, ...],
                                   message: str) -> None:  # fmt: skip
    repo = tmp_path / "repo"
    publish(affine_bundle, repo, 1)
    r = cli("serve", repo, *args)
    assert r.code == 2 and message in r.last_line and len(r.err.strip().splitlines()) == 1, r.err


def rollout_of(mode: str = "shadow") -> Rollout:
    return Rollout("m", mode, 1, 2, 1.0, 1000, 7, 0.0)


def counts(agreed: int, samples: int, errors: tuple[int, int] = (0, 0), n: int = 1000) -> dict:
    latency = [0] * 160
    latency[10] = n
    return {"samples": samples, "agreed": agreed, "requests": {"serving": n, "candidate": n},
            "errors": {"serving": errors[0], "candidate": errors[1]}, "latency": {"serving": latency,
            "candidate": latency}, "service": {"serving": latency, "candidate": latency}}  # fmt: skip


def test_the_checks_judge_the_evidence_and_fail_early_only_beyond_doubt() -> None:
    from modelship.serving.control.evidence import Policy

    policy = Policy("shadow", min_agreement=0.9, drift=True)
    by = {f["check"]: f for f in checks(counts(950, 1000), policy, ("ok", "ok"), 1)}
    assert all(f["passed"] for f in by.values()) and not any(f["early"] for f in by.values())
    assert by["drift"]["text"] == "drift status ok no worse than version 1's ok"
    unjudged = {f["check"]: f for f in checks(counts(950, 1000), policy, ("none", "ok"), 1)}["drift"]
    assert unjudged["passed"] is None and unjudged["text"] == "drift status none, version 1's ok: not judged yet"
    by = {f["check"]: f for f in checks(counts(880, 1000), policy, ("drift", "ok"), 1)}
    assert by["agreement"]["passed"] is False and not by["agreement"]["early"]  # 0.88: not beyond doubt
    assert by["drift"]["passed"] is False and by["drift"]["text"] == "drift status drift worse than version 1's ok"
    assert {f["check"]: f for f in checks(counts(0, 20), policy, None, 1)}["agreement"]["early"]
    errors = {f["check"]: f for f in checks(counts(1000, 1000, (0, 30)), policy, None, 1)}["errors"]
    assert errors["early"] and errors["text"] == "error rate 0.030 > 0.000 (version 1's) + 0.01"
    low, high = wilson(45, 50, 1.96)
    assert 0.78 < low < 0.79 and 0.95 < high < 0.97  # the textbook interval of 45 of 50
    assert p99([0] * 160) is None and p99([0, 0, 100] + [0] * 157) == pytest.approx(1e-4 * 1.1**3)


def test_a_copy_reaches_its_version_as_its_own_preprocessing_makes_it() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    a = Preprocess((32, 32), 3, (0.49, 0.50, 0.48), (0.29, 0.30, 0.31))  # two trainings' own measurements
    b = Preprocess((32, 32), 3, (0.51, 0.47, 0.50), (0.30, 0.28, 0.29))
    xa, xb = preprocess_image(image, a)[None], preprocess_image(image, b)[None]
    pair = Pairing(rollout_of(), "serving", None, bridge(a.to_dict(), b.to_dict()))  # type: ignore[arg-type]
    copied = pair.copied(xa)
    assert copied.dtype == np.float32 and np.abs(copied - xb).max() < 1e-5 and np.abs(xa - xb).max() > 0.05
    assert bridge(a.to_dict(), a.to_dict()) is None
    manifest = {"input": {"name": "input", "shape": [3, 32, 32]}, "preprocess": a.to_dict()}
    assert inputs_differ(manifest, {**manifest, "preprocess": b.to_dict()}) == ""  # renormalized: compared
    other = {**manifest, "preprocess": {**a.to_dict(), "size": [64, 64]}}
    assert inputs_differ(manifest, other) == "their input size differs ([32, 32] against [64, 64])"
