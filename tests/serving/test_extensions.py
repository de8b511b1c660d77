"""Triton's extensions and tolerances, with Triton's own clients (tritonclient HTTP, gRPC and both aio) and KServe's
SDK: model configuration, classification, statistics, the gRPC stream, and what the field's servers forgive.

One server: a repository of `shapes-cnn` (the tiny cnn) and `affine` (2x + 1: every answer shows its input), both
loaded, under explicit control, with an API key, HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
import tritonclient.http.aio as tha
from google.protobuf import json_format

from tests.helpers import KEY, REPO, free_port, running_server
from tests.serving.test_grpc import AUTH, Both, grpc_error
from tests.serving.test_repository import make_repo

CLASSES = ("circle", "cross", "ring", "square", "triangle")
KSERVE = REPO / ".venv-kserve" / "bin" / "python"  # KServe's SDK pins a protobuf tritonclient.grpc cannot share


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, affine_bundle: Path) -> Iterator[Both]:
    tmp = tmp_path_factory.mktemp("extensions")
    repo = make_repo(tmp / "repo", {"shapes-cnn": [tiny_bundle], "affine": [affine_bundle]})
    port = free_port()
    args = ("--grpc-port", str(port), "--model-control", "explicit", "--load-model", "*", "--api-key", KEY)
    with running_server(repo, *args, tmp=tmp) as s:
        yield Both(s, f"127.0.0.1:{port}")


def batch(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def http_input(x: np.ndarray, binary: bool = True) -> th.InferInput:
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def grpc_input(x: np.ndarray) -> tg.InferInput:
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def top_k(logits: np.ndarray, k: int) -> list[list[str]]:
    """Triton's classification rows of logits, worked out here from the logits answer."""
    return [[f"{row[i]:f}:{i}:{CLASSES[i]}" for i in np.argsort(-row, kind="stable")[:k]] for row in logits]


def texts(rows: np.ndarray) -> list[list[str]]:
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in rows]


# ------------------------------------------------------------------------------------------------ configuration


def test_model_configuration_is_tritons_on_every_client(ext: Both) -> None:
    expected = {
        "name": "shapes-cnn", "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}}, "max_batch_size": 64,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, 32, 32]}],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [5], "label_filename": "labels.txt"}],
        "dynamic_batching": {"preferred_batch_size": [32], "max_queue_delay_microseconds": 0,
                             "preserve_ordering": False},
        "instance_group": [{"name": "shapes-cnn", "kind": "KIND_CPU", "count": 2}],
        "default_model_filename": "model.onnx",
    }  # fmt: skip
    http = ext.http()
    assert http.get_model_config("shapes-cnn", headers=dict(AUTH)) == expected
    assert http.get_model_config("shapes-cnn", "1", headers=dict(AUTH)) == expected
    config = ext.client().get_model_config("shapes-cnn", headers=AUTH).config
    assert (config.max_batch_size, list(config.input[0].dims), config.input[0].format) == (64, [3, 32, 32], 2)
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    assert json.loads(json.dumps(as_json).replace('"3"', "3").replace('"32"', "32").replace('"5"', "5")) == (
        {**expected, "dynamic_batching": {"preferred_batch_size": [32]}}  # (proto3 JSON leaves out 0 and false)
    )

    async def aio() -> tuple[dict, object]:
        h, g = tha.InferenceServerClient(ext.server.url.removeprefix("http://")), tga.InferenceServerClient(ext.grpc)
        try:
            return await h.get_model_config("affine", headers=dict(AUTH)), await g.get_model_config(
                "affine", headers=AUTH
            )
        finally:
            await h.close()
            await g.close()

    h_config, g_config = asyncio.run(aio())
    assert h_config["input"][0]["dims"] == [1, 2, 2] and h_config["output"][0]["dims"] == [4]
    assert list(g_config.config.output[0].dims) == [4]  # type: ignore[attr-defined]
    # a model that is not there: as for inference, on both protocols
    status, message = grpc_error(lambda: ext.client().get_model_config("nope", headers=AUTH))
    assert (
        status == "StatusCode.NOT_FOUND"
        and message == "unknown model 'nope'; this server serves 'affine', 'shapes-cnn'"
    )
    r = httpx.get(ext.server.url + "/v2/models/nope/config", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == message


# ------------------------------------------------------------------------------------------------ classification


def test_classification_is_the_top_k_of_the_logits_on_every_protocol(ext: Both) -> None:
    x = batch(4)
    http = ext.http()
    logits = http.infer("shapes-cnn", [http_input(x)], headers=dict(AUTH)).as_numpy("logits")
    for k in (1, 3, 5):
        expected = top_k(logits, k)
        for binary in (True, False):
            asked = th.InferRequestedOutput("logits", binary_data=binary, class_count=k)
            got = http.infer("shapes-cnn", [http_input(x, binary)], outputs=[asked], headers=dict(AUTH))
            assert got.as_numpy("logits").shape == (4, k) and texts(got.as_numpy("logits")) == expected, (k, binary)
        asked_g = tg.InferRequestedOutput("logits", class_count=k)
        got_g = ext.client().infer("shapes-cnn", [grpc_input(x)], outputs=[asked_g], headers=AUTH)
        assert texts(got_g.as_numpy("logits")) == expected and got_g.get_output("logits").datatype == "BYTES"

    async def aio() -> tuple[np.ndarray, np.ndarray]:
        h, g = tha.InferenceServerClient(ext.server.url.removeprefix("http://")), tga.InferenceServerClient(ext.grpc)
        two_h, two_g = (
            th.InferRequestedOutput("logits", class_count=2),
            tg.InferRequestedOutput("logits", class_count=2),
        )
        try:
            a = await h.infer("shapes-cnn", [http_input(x)], outputs=[two_h], headers=dict(AUTH))
            b = await g.infer("shapes-cnn", [grpc_input(x)], outputs=[two_g], headers=AUTH)
            return a.as_numpy("logits"), b.as_numpy("logits")
        finally:
            await h.close()
            await g.close()

    assert [texts(rows) for rows in asyncio.run(aio())] == [top_k(logits, 2)] * 2
    # k over the class count, or not a whole number: 400 / INVALID_ARGUMENT naming it
    wrong = "outputs[0].parameters.classification must be an integer from 1 to 5 (the number of classes), got 9"
    too_many = th.InferRequestedOutput("logits", class_count=9)
    over = {"outputs": [too_many], "headers": dict(AUTH)}
    assert grpc_error(lambda: http.infer("shapes-cnn", [http_input(x)], **over)) == ("400", wrong)
    over_g = {"outputs": [tg.InferRequestedOutput("logits", class_count=9)], "headers": AUTH}
    status, message = grpc_error(lambda: ext.client().infer("shapes-cnn", [grpc_input(x)], **over_g))
    assert (status, message) == ("StatusCode.INVALID_ARGUMENT", wrong)
    body = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x[0].ravel().tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": "2"}}]}  # fmt: skip
    r = httpx.post(ext.server.url + "/v2/models/shapes-cnn/infer", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"] == wrong.replace("got 9", "got '2'")


# ------------------------------------------------------------------------------------------------ statistics


def affine_stats(doc: dict) -> dict:
    return next(s for s in doc["model_stats"] if s["name"] == "affine")


def test_statistics_count_what_was_sent_on_every_protocol(ext: Both) -> None:
    """affine answers nothing before this test: its counts are exactly this test's requests."""
    before = affine_stats(ext.http().get_inference_statistics("affine", headers=dict(AUTH)))
    assert (before["inference_count"], before["execution_count"], before["last_inference"]) == (0, 0, 0)
    sizes = [1, 2, 3, 1, 4]
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    for i, n in enumerate(sizes):
        xs = np.repeat(x, n, axis=0)
        if i % 2:
            ext.client().infer("affine", [grpc_input(xs)], headers=AUTH)
        else:
            ext.http().infer("affine", [http_input(xs)], headers=dict(AUTH))
    bad = np.full((1, 1, 2, 2), np.nan, np.float32)  # refused by the batch's finiteness check: a failed request
    with pytest.raises(Exception, match="NaN or infinity"):
        ext.http().infer("affine", [http_input(bad)], headers=dict(AUTH))
    s = affine_stats(ext.http().get_inference_statistics("affine", headers=dict(AUTH)))
    inference = s["inference_stats"]
    assert s["version"] == "1" and s["inference_count"] == sum(sizes)
    assert inference["success"]["count"] == len(sizes) and inference["fail"]["count"] == 1
    assert inference["queue"]["count"] == inference["compute_infer"]["count"] == len(sizes)
    assert all(inference[k]["ns"] > 0 for k in ("success", "fail", "queue", "compute_input", "compute_infer"))
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == s["execution_count"] >= 1
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) == sum(sizes)
    assert abs(s["last_inference"] / 1000 - time.time()) < 60
    # the same figures on gRPC (sync and aio), for the model, and in the server-wide list
    g = json_format.MessageToDict(ext.client().get_inference_statistics("affine", headers=AUTH),
                                  preserving_proto_field_name=True)  # fmt: skip
    assert int(affine_stats(g)["inference_count"]) == sum(sizes)
    everything = httpx.get(ext.server.url + "/v2/models/stats", headers=AUTH).json()
    assert sorted((m["name"], m["version"]) for m in everything["model_stats"]) == [
        ("affine", "1"),
        ("shapes-cnn", "1"),
    ]

    async def aio() -> object:
        g = tga.InferenceServerClient(ext.grpc)
        try:
            return await g.get_inference_statistics("", headers=AUTH)
        finally:
            await g.close()

    assert sorted(m.name for m in asyncio.run(aio()).model_stats) == ["affine", "shapes-cnn"]  # type: ignore[attr-defined]
    r = httpx.get(ext.server.url + "/v2/models/nope/stats", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"].startswith("unknown model 'nope'")


# ------------------------------------------------------------------------------------------------ the stream


def test_a_stream_answers_every_request_and_goes_on_after_an_error(ext: Both) -> None:
    x = batch(2, seed=3)
    expected = ext.http().infer("shapes-cnn", [http_input(x)], headers=dict(AUTH)).as_numpy("logits")
    answers: queue.Queue = queue.Queue()
    client = ext.client()
    client.start_stream(lambda result, error: answers.put((result, error)), headers=AUTH)
    for i in range(6):
        client.async_stream_infer("nope" if i == 2 else "shapes-cnn", [grpc_input(x)], request_id=str(i))
    got = [answers.get(timeout=30) for _ in range(6)]
    client.stop_stream()
    errors = [str(e) for r, e in got if e is not None]
    assert errors == ["unknown model 'nope'; this server serves 'affine', 'shapes-cnn'"]
    results = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
    assert sorted(results) == ["0", "1", "3", "4", "5"]
    assert all(np.allclose(v, expected, atol=1e-6) for v in results.values())

    async def aio() -> list:
        g = tga.InferenceServerClient(ext.grpc)

        async def requests():  # type: ignore[no-untyped-def]
            for i in range(3):
                yield {"model_name": "shapes-cnn", "inputs": [grpc_input(x)], "request_id": f"a{i}"}

        try:
            return [item async for item in g.stream_infer(requests(), headers=AUTH)]
        finally:
            await g.close()

    streamed = asyncio.run(aio())
    assert sorted(r.get_response().id for r, e in streamed if e is None) == ["a0", "a1", "a2"]
    assert all(np.allclose(r.as_numpy("logits"), expected, atol=1e-6) for r, _ in streamed)


# ------------------------------------------------------------------------------------------------ tolerance


def test_the_field_s_tolerances_and_each_protocol_s_own_words(ext: Both) -> None:
    url = ext.server.url
    body = {"model_name": "affine", "model_version": "1", "inputs": [
        {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0.0, 1.0, 2.0, 3.0]}]}  # fmt: skip
    r = httpx.post(url + "/v2/models/affine/infer", json=body, headers=AUTH)  # what KServe's SDK sends
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]
    body["inputs"][0]["colour"] = "red"  # inside a tensor: still refused, by name
    r = httpx.post(url + "/v2/models/affine/infer", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"].startswith("unknown field(s) colour in inputs[0]")
    # a method a route does not take: 405 with Allow
    r = httpx.get(url + "/v2/models/affine/infer", headers=AUTH)
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    assert r.json() == {"error": "GET is not allowed on /v2/models/affine/infer; it takes POST"}
    r = httpx.post(url + "/v2/models/affine/config", headers=AUTH)
    assert (r.status_code, r.headers["allow"]) == (405, "GET")
    # extensions: exactly those served
    served = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
    assert httpx.get(url + "/v2", headers=AUTH).json()["extensions"] == served
    assert list(ext.client().get_server_metadata(headers=AUTH).extensions) == served
    # unload what is not loaded or not there: success, as Triton; a load of what is not there names no folder
    ext.client().unload_model("not-there", headers=AUTH)
    assert httpx.post(url + "/v2/repository/models/not-there/unload", headers=AUTH).status_code == 200
    r = httpx.post(url + "/v2/repository/models/not-there/load", headers=AUTH)
    assert r.status_code == 404 and r.json() == {"error": "no model 'not-there' in the model repository"}
    ext.client().unload_model("affine", headers=AUTH)
    ext.client().unload_model("affine", headers=AUTH)  # again: already done, still a success
    # each protocol's clients are told their own protocol's calls
    r = httpx.post(url + "/v2/models/affine/infer", json=body, headers=AUTH)
    assert r.json()["error"] == "model 'affine' is not loaded; POST /v2/repository/models/affine/load loads it"
    status, message = grpc_error(lambda: ext.client().infer("affine", [grpc_input(np.zeros((1, 1, 2, 2), np.float32))],
                                                            headers=AUTH))  # fmt: skip
    assert (status, message) == ("StatusCode.NOT_FOUND", "model 'affine' is not loaded; RepositoryModelLoad loads it")
    ext.client().load_model("affine", headers=AUTH)
    index = ext.http().get_model_repository_index(headers=dict(AUTH))
    assert not [row for row in index if "/" in row.get("reason", "")]  # no folder of the server's in any reason


# ------------------------------------------------------------------------------------------------ KServe's SDK

KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferInput, InferRequest, InferenceGRPCClient, InferenceRESTClient, RESTConfig

url, grpc_url, key = sys.argv[1:4]
x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)

async def main():
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    grpc = InferenceGRPCClient(grpc_url)
    headers = {"x-api-key": key}
    out = {"rest_live": await rest.is_server_live(url, headers=headers),
           "rest_ready": await rest.is_server_ready(url, headers=headers),
           "rest_model_ready": await rest.is_model_ready(url, "affine", headers=headers)}
    for binary in (False, True):
        i = InferInput("input", [2, 1, 2, 2], "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        r = await rest.infer(url, InferRequest(model_name="affine", infer_inputs=[i], request_id="r1"),
                             model_name="affine", headers=headers)
        out[f"rest_infer_binary_{binary}"] = r.outputs[0].as_numpy().tolist()
    meta = [("x-api-key", key)]
    out["grpc_live"] = await grpc.is_server_live(headers=meta)
    out["grpc_ready"] = await grpc.is_server_ready(headers=meta)
    out["grpc_model_ready"] = await grpc.is_model_ready("affine", headers=meta)
    i = InferInput("input", [2, 1, 2, 2], "FP32")
    i.set_data_from_numpy(x, binary_data=False)
    r = await grpc.infer(InferRequest(model_name="affine", infer_inputs=[i], request_id="g1"), headers=meta)
    out["grpc_infer"] = r.outputs[0].as_numpy().tolist()
    await rest.close()
    await grpc.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.skipif(not KSERVE.exists(), reason="KServe's SDK is installed in .venv-kserve by `make test`")
def test_kserves_own_sdk_infers_and_asks_readiness_over_rest_and_grpc(ext: Both) -> None:
    r = subprocess.run([KSERVE, "-c", KSERVE_SCRIPT, ext.server.url, ext.grpc, KEY], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = (2 * np.arange(8, dtype=np.float32).reshape(2, 4) + 1).tolist()
    assert out == {
        "rest_live": True, "rest_ready": True, "rest_model_ready": True,
        "rest_infer_binary_False": expected, "rest_infer_binary_True": expected,
        "grpc_live": True, "grpc_ready": True, "grpc_model_ready": True, "grpc_infer": expected,
    }  # fmt: skip
