"""A real server on a loopback port: endpoints, the training pipeline's preprocessing, tritonclient, bad input."""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image

from modelship.client import Client, ClientError
from modelship.preprocess import Preprocess
from modelship.training.checkpoint import load_checkpoint
from modelship.training.data import EvalTransform
from tests.helpers import Server, run_modelship, scrape


def val_png(data_dir: Path, cls: str = "triangle") -> Path:
    return sorted(data_dir.glob(f"shapes-*/val/{cls}/*.png"))[0]


def onnx_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.astype(np.float32)})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def test_health_info_and_v2_metadata(server: Server, tiny_bundle: Path) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    info = httpx.get(server.url + "/info").json()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert info["model"]["name"] == "shapes-cnn" and info["model"]["classes"] == manifest["classes"]
    assert info["model"]["preprocess"] == manifest["preprocess"]
    assert "checkpoint" not in info["model"]["source"]  # no paths of the exporting machine
    threads = max(1, (os.cpu_count() or 1) // 2)  # cores shared by the two default workers
    expected = {
        "backend": "onnx",
        "max_batch_size": 32,
        "batch_timeout": 0.0,
        "workers_per_device": 2,
        "threads": threads,
    }
    assert {k: info["server"][k] for k in expected} == expected
    served = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
    assert httpx.get(server.url + "/v2").json()["extensions"] == served
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2/models/shapes-cnn").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]
    assert httpx.get(server.url + "/v2/models/shapes-cnn/versions/1/ready").status_code == 200


def test_unknown_model_or_version_is_404_with_an_error_body(server: Server) -> None:
    r = httpx.get(server.url + "/v2/models/resnet/ready")
    assert r.status_code == 404 and r.json() == {"error": "unknown model 'resnet'; this server serves 'shapes-cnn'"}
    r = httpx.post(server.url + "/v2/models/shapes-cnn/versions/2/infer", json={})
    assert r.status_code == 404 and "has no version '2'" in r.json()["error"]


def test_served_png_matches_the_training_eval_preprocessing(
    server: Server, tiny_bundle: Path, tiny_ckpt: Path, data_dir: Path
) -> None:
    png = val_png(data_dir)
    # what the training pipeline itself would feed the exported model
    x = EvalTransform(Preprocess.from_dict(load_checkpoint(tiny_ckpt)["data"]))(Image.open(png)).numpy()
    p = softmax(onnx_logits(tiny_bundle, x[None])[0])
    classes = json.loads((tiny_bundle / "manifest.json").read_text())["classes"]

    answers = [
        httpx.post(
            server.url + "/predict", json={"image": base64.b64encode(png.read_bytes()).decode(), "top_k": 5}
        ).json(),
        httpx.post(
            server.url + "/predict", files={"file": (png.name, png.read_bytes(), "image/png")}, data={"top_k": "5"}
        ).json(),
        httpx.post(server.url + "/predict", content=png.read_bytes(), headers={"content-type": "image/png"}).json(),
    ]
    for a in answers:
        assert a["label"] == classes[int(p.argmax())] and a["index"] == int(p.argmax())
        assert a["score"] == pytest.approx(float(p.max()), abs=1e-6)
        assert [t["index"] for t in a["top_k"]] == [int(i) for i in np.argsort(-p)[: len(a["top_k"])]]


def test_inputs_tensor_payload(server: Server, tiny_bundle: Path) -> None:
    x = np.random.default_rng(3).standard_normal((3, 32, 32)).astype(np.float32)
    a = httpx.post(server.url + "/predict", json={"inputs": x.tolist(), "top_k": 1}).json()
    p = softmax(onnx_logits(tiny_bundle, x[None])[0])
    assert (
        a["index"] == int(p.argmax()) and a["score"] == pytest.approx(float(p.max()), abs=1e-6) and len(a["top_k"]) == 1
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_like_onnxruntime(server: Server, tiny_bundle: Path, binary: bool) -> None:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("shapes-cnn")
    assert client.get_model_metadata("shapes-cnn")["platform"] == "onnxruntime_onnx"
    x = np.random.default_rng(4).standard_normal((7, 3, 32, 32)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("shapes-cnn", [inp], outputs=[out], request_id="abc")
    assert result.get_response()["id"] == "abc"
    np.testing.assert_allclose(result.as_numpy("logits"), onnx_logits(tiny_bundle, x), atol=1e-5)
    with pytest.raises(Exception, match=r"\[404\] unknown model 'other'"):
        client.infer("other", [inp])


def test_python_client_and_predict_command(server: Server, tiny_bundle: Path, data_dir: Path) -> None:
    client = Client(server.url)
    assert client.health()
    png = val_png(data_dir, "circle")
    answer = client.predict_image(png, top_k=2)
    assert len(answer["top_k"]) == 2
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(client.infer("shapes-cnn", x), onnx_logits(tiny_bundle, x), atol=1e-5)
    np.testing.assert_allclose(client.infer("shapes-cnn", x, binary=False), onnx_logits(tiny_bundle, x), atol=1e-5)
    with pytest.raises(ClientError, match="HTTP 400: top_k must be an integer from 1 to 5"):
        client.predict_image(png, top_k=9)

    r = run_modelship("predict", "--url", server.url, str(png), str(val_png(data_dir, "ring")))
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[:2] == [str(png), answer["label"]]
    r = run_modelship("predict", "--url", server.url, "/no/such.png")
    assert r.code == 2 and r.last_line == "modelship predict: error: image /no/such.png does not exist"
    r = run_modelship("predict", "--url", "http://127.0.0.1:9", str(png))
    assert r.code == 1 and "cannot reach http://127.0.0.1:9" in r.last_line


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()[:300]


V2_INF_HEADER = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                 "parameters": {"binary_data_size": 3 * 32 * 32 * 4}}]}
).encode()  # fmt: skip
BAD_REQUESTS = [
    ("/predict", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("/predict", {"content": b"", "headers": {"content-type": "application/json"}}, 400, "the request body is empty"),
    ("/predict", {"json": {"top_k": 1}}, 400, "give exactly one of image or inputs"),
    (
        "/predict",
        {"json": {"inputs": [[[0.0] * 32] * 32] * 2}},
        400,
        "inputs has shape [2, 32, 32]; expected [3, 32, 32]",
    ),
    ("/predict", {"json": {"inputs": [[["x"] * 32] * 32] * 3}}, 400, "inputs must hold numbers only; found strings"),
    (
        "/predict",
        {
            "content": b'{"inputs": ' + json.dumps([[[0.0] * 32] * 32] * 3).replace("0.0", "NaN", 1).encode() + b"}",
            "headers": {"content-type": "application/json"},
        },
        400,
        "contains NaN or infinity",
    ),
    (
        "/predict",
        {"json": {"image": base64.b64encode(b"GIF89a nonsense").decode()}},
        400,
        "is not an image PIL can read",
    ),
    ("/predict", {"json": {"image": "not base64 !!"}}, 400, "image is not valid base64"),
    ("/predict", {"json": {"image": base64.b64encode(truncated_png()).decode()}}, 400, "truncated"),
    (
        "/predict",
        {"json": {"inputs": [[[0.0] * 32] * 32] * 3, "top_k": 6}},
        400,
        "top_k must be an integer from 1 to 5",
    ),
    ("/predict", {"files": {"upload": ("x.png", b"123", "image/png")}}, 400, "needs a file field named `file`"),
    (
        "/predict",
        {"content": b"a,b,c", "headers": {"content-type": "text/csv"}},
        415,
        "Content-Type text/csv is not supported",
    ),
    (
        "/v2/models/shapes-cnn/infer",
        {"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [65, 3, 32, 32], "data": []}]}},
        400,
        "input batch of 65 is over this server's limit of 64",
    ),
    (
        "/v2/models/shapes-cnn/infer",
        {"json": {"inputs": [{"name": "input", "datatype": "INT8", "shape": [1, 3, 32, 32], "data": []}]}},
        400,
        "datatype 'INT8' is not supported",
    ),
    (
        "/v2/models/shapes-cnn/infer",
        {"content": b'{"inputs": []}xx', "headers": {"inference-header-content-length": "14"}},
        400,
        "inputs must be a list with one tensor",
    ),
    (
        "/v2/models/shapes-cnn/infer",
        {
            "content": V2_INF_HEADER + np.full(3 * 32 * 32, np.inf, "<f4").tobytes(),
            "headers": {"inference-header-content-length": str(len(V2_INF_HEADER))},
        },
        400,
        "input contains NaN or infinity; expected finite numbers",
    ),
]


@pytest.mark.parametrize(("path", "kwargs", "status", "message"), BAD_REQUESTS)
def test_malformed_requests_get_4xx_naming_the_problem(
    server: Server, path: str, kwargs: dict, status: int, message: str
) -> None:
    r = httpx.post(server.url + path, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_bad_requests_never_fail_the_good_ones_batched_with_them(server: Server, tiny_bundle: Path) -> None:
    x = np.random.default_rng(6).standard_normal((3, 32, 32)).astype(np.float32)
    expected = int(onnx_logits(tiny_bundle, x[None])[0].argmax())

    def call(i: int) -> tuple[int, int | None]:
        doc = {"inputs": [[["bad"] * 32] * 32] * 3} if i % 2 else {"inputs": x.tolist()}
        r = httpx.post(server.url + "/predict", json=doc, timeout=30)
        return r.status_code, r.json().get("index")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    assert [s for s, _ in results[0::2]] == [200] * 32 and {i for _, i in results[0::2]} == {expected}
    assert [s for s, _ in results[1::2]] == [400] * 32
    assert httpx.get(server.url + "/health").status_code == 200


def test_oversized_bodies_get_413_without_being_read(server: Server) -> None:
    big = b"0" * (17 * 1024 * 1024)
    r = httpx.post(server.url + "/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the 16777216 byte payload limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(17):
            yield b"1" * (1024 * 1024)

    r = httpx.post(server.url + "/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    def multipart():  # a streamed upload past the limit is a 413 too, not a parse error
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        yield from chunks()

    r = httpx.post(
        server.url + "/predict", content=multipart(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413 and "payload limit" in r.json()["error"]


def test_metrics_count_requests_batches_and_queue_time(server: Server) -> None:
    before = scrape(server.url)
    x = np.zeros((3, 32, 32)).tolist()
    for _ in range(5):
        assert httpx.post(server.url + "/predict", json={"inputs": x}).status_code == 200
    httpx.post(server.url + "/predict", json={"inputs": "bad"})
    after = scrape(server.url)
    key = 'modelship_requests_total{route="/predict",status="200"}'
    assert after[key] - before.get(key, 0) == 5
    bad = 'modelship_requests_total{route="/predict",status="400"}'
    assert after[bad] - before.get(bad, 0) == 1
    batch = 'modelship_batch_size_sum{model="shapes-cnn",version="1"}'
    assert after[batch] - before.get(batch, 0) == 5  # samples run, labelled by the model version
    assert after["modelship_queue_seconds_count"] - before.get("modelship_queue_seconds_count", 0) == 5
    assert 'modelship_request_duration_seconds_bucket{le="0.1",route="/predict"}' in after
