"""`modelship serve REPO`: a model repository served by Triton's rules, tested with tritonclient on real servers.

The versions are affine models whose outputs show which version answered: version 1 is 2x + 1, version 2 is 3x.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from modelship.files import sha256_file
from modelship.repository import publish
from modelship.serving.control.table import REFRESH
from tests.helpers import Server, free_port, running_server
from tests.serving.test_server import val_png

X = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)  # a batch of two [1, 2, 2] inputs
ANSWERS = {"1": 2 * X.reshape(2, -1) + 1, "2": 3 * X.reshape(2, -1)}  # what each version's logits are


def make_repo(root: Path, models: dict[str, list[Path]]) -> Path:
    """root/<name>/<i>/ holding a copy of the i-th bundle of each model."""
    for name, bundles in models.items():
        for i, bundle in enumerate(bundles, 1):
            shutil.copytree(bundle, root / name / str(i))
    return root


def infer(client: triton.InferenceServerClient, version: str = "") -> tuple[str, np.ndarray]:
    inp = triton.InferInput("input", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    r = client.infer("affine", [inp], model_version=version)
    return r.get_response()["model_version"], r.as_numpy("logits")


def triton_error(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.message())


@pytest.fixture(scope="module")
def all_versions(tmp_path_factory: pytest.TempPathFactory, affine_bundle: Path, affine_v2: Path,
                 tiny_bundle: Path) -> Iterator[Server]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("repo-all")
    repo = make_repo(tmp / "repo", {"affine": [affine_bundle, affine_v2], "shapes": [tiny_bundle]})
    with running_server(repo, "--version-policy", "all", tmp=tmp) as s:
        yield s


def test_every_version_is_addressable_and_no_version_means_the_newest(all_versions: Server) -> None:
    client = triton.InferenceServerClient(all_versions.url.removeprefix("http://"))
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("affine", "1", "READY"), ("affine", "2", "READY"), ("shapes", "1", "READY"),
    ]  # fmt: skip
    for asked, answered in (("", "2"), ("1", "1"), ("2", "2")):
        version, logits = infer(client, asked)
        assert version == answered and np.array_equal(logits, ANSWERS[answered])
    assert client.is_model_ready("affine", "1") and client.is_model_ready("affine") and client.is_server_ready()
    assert not client.is_model_ready("affine", "3")
    url = all_versions.url.removeprefix("http://")
    with ThreadPoolExecutor(8) as pool:  # both versions at once: a batch of one never carries the other's rows
        answers = pool.map(lambda v: infer(triton.InferenceServerClient(url), v), "12" * 20)
        for asked, (answered, logits) in zip("12" * 20, answers, strict=True):
            assert answered == asked and np.array_equal(logits, ANSWERS[asked])
    assert client.get_model_metadata("affine")["versions"] == ["2", "1"]
    assert triton_error(lambda: infer(client, "3")) == "model 'affine' has no version '3'; its versions are '1', '2'"
    assert "not under explicit control (--model-control none)" in triton_error(lambda: client.load_model("affine"))


def test_images_go_to_each_model_by_name_and_predict_needs_one(all_versions: Server, data_dir: Path) -> None:
    png = val_png(data_dir).read_bytes()
    r = httpx.post(all_versions.url + "/v2/models/shapes/predict", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and (r.json()["model_name"], r.json()["model_version"]) == ("shapes", "1")
    assert r.json()["label"] in {"circle", "cross", "ring", "square", "triangle"}
    r = httpx.post(all_versions.url + "/predict", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 400
    assert r.json()["error"] == "this server serves 2 models (affine, shapes); POST /v2/models/{name}/predict"
    info = httpx.get(all_versions.url + "/info").json()
    assert [(m["name"], m["version"], m["state"]) for m in info["models"]] == [
        ("affine", "1", "READY"), ("affine", "2", "READY"), ("shapes", "1", "READY"),
    ]  # fmt: skip
    assert all(m["resident_bytes"] > 0 for m in info["models"])  # what loading each took in the workers
    assert info["model"] is None and info["server"]["model_control"] == "none"
    doc = httpx.get(all_versions.url + "/openapi.json").json()
    assert "`affine` version 2 (READY): 4 classes, input [N, 1, 2, 2]" in doc["info"]["description"]
    assert "`shapes` version 1 (READY)" in doc["info"]["description"]
    text = httpx.get(all_versions.url + "/metrics").text
    assert 'modelship_batch_size_count{model="affine",version="1"}' in text


def test_explicit_control_loads_and_unloads_by_request(tmp_path: Path, affine_bundle: Path, affine_v2: Path,
                                                       tiny_bundle: Path) -> None:  # fmt: skip
    repo = make_repo(tmp_path / "repo", {"affine": [affine_bundle, affine_v2], "shapes": [tiny_bundle]})
    with running_server(repo, "--model-control", "explicit", "--load-model", "shapes", tmp=tmp_path) as s:
        client = triton.InferenceServerClient(s.url.removeprefix("http://"))
        index = {(m["name"], m["version"]): (m["state"], m["reason"]) for m in client.get_model_repository_index()}
        assert index == {("affine", ""): ("UNAVAILABLE", "unloaded"), ("shapes", "1"): ("READY", "")}
        assert triton_error(lambda: infer(client)) == (
            "model 'affine' is not loaded; POST /v2/repository/models/affine/load loads it"
        )
        client.load_model("affine")  # answered once loaded everywhere: the newest version (--version-policy latest)
        version, logits = infer(client)
        assert version == "2" and np.array_equal(logits, ANSWERS["2"])
        assert [m["version"] for m in client.get_model_repository_index() if m["name"] == "affine"] == ["2"]
        unloadable = repo / "affine" / "3"  # hashes that match a file no runtime can load: fails on the workers
        shutil.copytree(affine_v2, unloadable)
        (unloadable / "model.onnx").write_bytes(b"not an onnx graph")
        manifest = json.loads((unloadable / "manifest.json").read_text())
        manifest["artifacts"]["onnx"].update(sha256=sha256_file(unloadable / "model.onnx"), bytes=17)
        (unloadable / "manifest.json").write_text(json.dumps(manifest))
        assert triton_error(lambda: client.load_model("affine")) == (
            "failed to load 'affine': onnx artifact model.onnx: not an ONNX file (ONNX Runtime: [ONNXRuntimeError] : "
            "7 : INVALID_PROTOBUF : Load model from model.onnx failed:Protobuf parsing failed.)"
        )  # one line, and no folder of the server's in it
        rows = {m["version"]: m["state"] for m in client.get_model_repository_index() if m["name"] == "affine"}
        assert rows == {"2": "READY", "3": "UNAVAILABLE"} and infer(client)[0] == "2"  # version 2 serves on
        shutil.rmtree(unloadable)
        client.unload_model("affine")  # answered once drained and unloaded
        assert not client.is_model_ready("affine")
        assert client.is_model_ready("shapes")  # the other model serves on
        assert triton_error(lambda: client.load_model("nope")) == "no model 'nope' in the model repository"
        client.unload_model("affine")  # not loaded: done already, a success (Triton's answer too)


@contextlib.contextmanager
def under_load(url: str, clients: int = 4) -> Iterator[tuple[list[tuple[float, str]], list[str]]]:
    """`clients` threads sending v2 requests without a version for as long as the block runs: (answers: when each
    came back and the version that answered, in that order; failures: every error or wrong answer)."""
    answers: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        own = triton.InferenceServerClient(url.removeprefix("http://"))
        while not stop.is_set():
            try:
                version, logits = infer(own)
                answers.append((time.monotonic(), version))
                if not np.array_equal(logits, ANSWERS[version]):
                    failures.append(f"version {version} answered {logits.tolist()}")
            except Exception as e:  # every failure counts: none is expected
                failures.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


def until_answered_by(version: str, answers: list[tuple[float, str]], then: float = 1.0) -> None:
    """Wait (30 s at most) until `version` answered the latest request, then `then` seconds more."""
    deadline = time.monotonic() + 30
    while not (answers and answers[-1][1] == version) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(then)


def test_poll_swaps_to_a_published_version_without_failing_a_request(
    tmp_path: Path, affine_bundle: Path, affine_v2: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {"affine": [affine_bundle]})
    with running_server(repo, "--model-control", "poll", "--poll-interval", "0.5", tmp=tmp_path) as s:
        client = triton.InferenceServerClient(s.url.removeprefix("http://"), concurrency=4)
        with under_load(s.url) as (answers, failures):
            time.sleep(1.0)
            published = publish(affine_v2, repo)  # CI's `--publish`: the next version, in one rename
            until_answered_by("2", answers)
        assert published == repo / "affine" / "2"
        seen = [version for _, version in answers]
        assert failures == [] and seen[0] == "1" and seen[-1] == "2" and len(seen) > 50
        # it switched, and stayed: each API server reads the table at most every REFRESH seconds, so for about that
        # long one may still route to version 1 after another answered from version 2 (a count of requests would
        # depend on the machine's speed: 100 of them are 0.07 s at 1,400 req/s)
        first_new = seen.index("2")
        last_old = len(seen) - 1 - seen[::-1].index("1")
        assert first_new > 0 and answers[last_old][0] - answers[first_new][0] < 5 * REFRESH, (first_new, last_old)
        deadline = time.monotonic() + 10
        while [m["version"] for m in client.get_model_repository_index()] != ["2"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(m["version"], m["state"]) for m in client.get_model_repository_index()] == [("2", "READY")]

        broken = repo / "affine" / "3"
        shutil.copytree(affine_v2, repo / "affine" / ".incoming")
        (repo / "affine" / ".incoming" / "model.onnx").write_bytes(b"not the exported file")
        (repo / "affine" / ".incoming").rename(broken)
        deadline = time.monotonic() + 10
        while len(client.get_model_repository_index()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = {m["version"]: m for m in client.get_model_repository_index()}
        assert rows["3"]["state"] == "UNAVAILABLE" and "does not match its manifest" in rows["3"]["reason"]
        assert rows["2"]["state"] == "READY" and infer(client)[0] == "2"  # what served keeps serving
        shutil.rmtree(broken)


def test_poll_rolls_back_to_the_version_left_without_failing_a_request(
    tmp_path: Path, affine_bundle: Path, affine_v2: Path
) -> None:
    """Removing the newest version's folder: the version left is loaded before requests stop going to the one that
    left (which answers from memory meanwhile), as the forward swap does."""
    repo = make_repo(tmp_path / "repo", {"affine": [affine_bundle, affine_v2]})
    with running_server(repo, "--model-control", "poll", "--poll-interval", "0.5", tmp=tmp_path) as s:
        client = triton.InferenceServerClient(s.url.removeprefix("http://"))
        assert [(m["version"], m["state"]) for m in client.get_model_repository_index()] == [("2", "READY")]
        with under_load(s.url) as (answers, failures):
            time.sleep(1.0)
            shutil.rmtree(repo / "affine" / "2")  # the rollback
            until_answered_by("1", answers)
        seen = [version for _, version in answers]
        assert failures == [] and seen[0] == "2" and seen[-1] == "1" and len(seen) > 50, failures[:5]
        deadline = time.monotonic() + 10
        while [m["version"] for m in client.get_model_repository_index()] != ["1"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(m["version"], m["state"]) for m in client.get_model_repository_index()] == [("1", "READY")]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"affine/latest": None}, "'latest' is not a version folder; a model folder holds only versions named by "
                                  "positive integers"),
        ({"affine": None}, "holds no version; expected"),
        ({"bad name/1": "bundle"}, "'bad name' is not a model name"),
        ({"affine/1": "broken"}, "is not valid JSON"),
    ],
)  # fmt: skip
def test_a_repository_that_cannot_be_served_is_refused_at_start(tmp_path: Path, affine_bundle: Path, cli,
                                                                layout: dict, message: str) -> None:  # fmt: skip
    repo = tmp_path / "repo"
    for path, what in layout.items():
        if what is None:
            (repo / path).mkdir(parents=True)
        else:
            shutil.copytree(affine_bundle, repo / path)
        if what == "broken":
            (repo / path / "manifest.json").write_text("{")
    r = cli("serve", repo, "--port", free_port())
    assert r.code == 2 and r.last_line.startswith("modelship serve: error: ") and message in r.last_line, r.last_line


def test_model_control_flags_are_checked(tmp_path: Path, affine_bundle: Path, cli) -> None:
    r = cli("serve", affine_bundle, "--load-model", "affine")
    assert r.code == 2 and r.last_line.endswith("--load-model chooses what explicit model control loads at start; "
                                                "add --model-control explicit")  # fmt: skip
    r = cli("serve", affine_bundle, "--model-control", "poll")
    assert r.code == 2 and r.last_line.endswith(f"--model-control poll needs a model repository; {affine_bundle} is "
                                                "a bundle")  # fmt: skip
    r = cli("serve", affine_bundle, "--in-process", "--model-control", "explicit")
    assert r.code == 2 and "--in-process serves the models loaded at start" in r.last_line
    repo = make_repo(tmp_path / "repo", {"affine": [affine_bundle]})
    r = cli("serve", repo, "--model-control", "explicit", "--load-model", "nope")
    assert r.code == 2 and r.last_line.endswith(f"--load-model nope: no such model in {repo} (it has affine)")
    r = cli("serve", repo, "--poll-interval", "0")
    assert r.code == 2 and r.last_line.endswith("--poll-interval must be a positive number of seconds, got 0.0")


def test_in_process_api_servers_serve_a_repository_loaded_at_start(tmp_path: Path, affine_bundle: Path,
                                                                   affine_v2: Path) -> None:  # fmt: skip
    repo = make_repo(tmp_path / "repo", {"affine": [affine_bundle, affine_v2], "copy": [affine_bundle]})
    with running_server(repo, "--in-process", "--version-policy", "all", tmp=tmp_path) as s:
        client = triton.InferenceServerClient(s.url.removeprefix("http://"))
        for asked in ("1", "2", ""):
            version, logits = infer(client, asked)
            assert np.array_equal(logits, ANSWERS[version]) and version == (asked or "2")
        inp = triton.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X, binary_data=True)
        assert np.array_equal(client.infer("copy", [inp]).as_numpy("logits"), ANSWERS["1"])
