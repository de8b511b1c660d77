"""Dynamic batching with two inference workers: every answer goes to its own request, and the metrics add up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import Server, running_server, scrape

CLIENTS = 64


@pytest.fixture(scope="module")
def batching_server(affine_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--max-batch-size", "16", "--batch-timeout", "0.05", "--workers-per-device", "2", "--threads", "1"]
    with running_server(affine_bundle, *args, tmp=tmp_path_factory.mktemp("batching")) as s:
        yield s


async def _storm(url: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[int, dict]], int]:
    """64 concurrent clients, each with its own inputs: v2 batches of 1-4 and /predict one-hots."""
    rng = np.random.default_rng(7)
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def v2(i: int) -> tuple[np.ndarray, np.ndarray]:
            n = 1 + i % 4
            # integers and halves: 2x + 1 is exact in float32, so equality is exact
            x = (rng.integers(-1000, 1000, (n, 1, 2, 2)) / 2).astype(np.float32)
            doc = {
                "id": str(i),
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 1, 2, 2], "data": x.ravel().tolist()}],
            }
            r = await client.post("/v2/models/affine/infer", json=doc)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == str(i)
            return x, np.asarray(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])

        async def predict(i: int) -> tuple[int, dict]:
            x = np.zeros((1, 2, 2), np.float32)
            x.flat[i % 4] = 5.0 + i  # the hot pixel names the answer's index
            r = await client.post("/predict", json={"inputs": x.tolist(), "top_k": 4})
            assert r.status_code == 200, r.text
            return i, r.json()

        v2_results = asyncio.gather(*(v2(i) for i in range(CLIENTS)))
        predict_results = asyncio.gather(*(predict(i) for i in range(CLIENTS)))
        a, b = await asyncio.gather(v2_results, predict_results)
    samples = sum(len(x) for x, _ in a) + len(b)
    return list(a), list(b), samples


def test_every_answer_goes_back_to_its_own_request(batching_server: Server) -> None:
    before = scrape(batching_server.url)
    v2, predicted, samples = asyncio.run(_storm(batching_server.url))
    for x, y in v2:
        assert np.array_equal(y, 2 * x.reshape(len(x), -1) + 1)
    for i, answer in predicted:
        assert answer["index"] == i % 4 and answer["label"] == "abcd"[i % 4]
        hot = 2 * (5.0 + i)  # logit 2*(5+i)+1 against 1 on the three others
        assert answer["score"] == pytest.approx(1 / (1 + 3 * np.exp(-hot)), rel=1e-9)

    after = scrape(batching_server.url)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    # two API server processes and two workers wrote these; the sums are over all of them
    assert delta('modelship_requests_total{route="/v2/models/{name}/infer",status="200"}') == CLIENTS
    assert delta('modelship_requests_total{route="/predict",status="200"}') == CLIENTS
    version = 'model="affine",version="1"'  # the batch metrics carry the model version they ran
    assert delta(f"modelship_batch_size_sum{{{version}}}") == samples
    assert delta("modelship_queue_seconds_count") == 2 * CLIENTS
    requests_batched = delta(f"modelship_batch_requests_sum{{{version}}}")
    batches = delta(f"modelship_batch_requests_count{{{version}}}")
    assert delta('modelship_inferences_total{model="affine",protocol="http",version="1"}') == 2 * CLIENTS
    assert requests_batched == 2 * CLIENTS
    assert batches < requests_batched / 2, "concurrent requests should share forward passes"
    assert len(batching_server.children()) == 2


def test_info_reports_the_batching_settings(batching_server: Server) -> None:
    server = httpx.get(batching_server.url + "/info").json()["server"]
    assert (server["max_batch_size"], server["batch_timeout"], server["workers_per_device"]) == (16, 0.05, 2)


def test_an_input_with_nan_or_infinity_is_refused_alone_and_the_rest_of_its_batch_runs(
    affine_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finiteness is checked where a batch is formed: the request at fault gets its 400, the others their logits."""
    from modelship.backends import onnx_backend
    from modelship.serving import metrics
    from modelship.serving.dispatch.transport import Request
    from modelship.serving.dispatch.worker import Held
    from modelship.serving.errors import RequestError

    monkeypatch.setenv(metrics.ENV, str(tmp_path))  # the batch's metrics: a server run earlier in this process
    # may have left the variable naming its own folder, removed when it stopped
    manifest = json.loads((affine_bundle / "manifest.json").read_text())
    backend = onnx_backend(affine_bundle / manifest["artifacts"]["onnx"]["path"], "cpu", 1)
    held = Held(backend, (1, 2, 2), 16)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 1, 2, 2)).astype(np.float32) for n in (1, 2, 1, 3)]
    xs[1][1, 0, 0, 1] = np.nan
    xs[3][2, 0, 1, 0] = -np.inf
    answers = held.run([Request(b"%d" % i, 0, 0.0, x, "affine/1") for i, x in enumerate(xs)], "affine/1")
    for i in (1, 3):
        assert isinstance(answers[i], RequestError) and answers[i].status == 400
        assert answers[i].message == "input contains NaN or infinity; expected finite numbers"
    for i in (0, 2):
        np.testing.assert_allclose(answers[i], backend(xs[i]), atol=1e-6)
    finite = held.run([Request(b"a", 0, 0.0, xs[0], "affine/1"), Request(b"b", 0, 0.0, xs[2], "affine/1")], "affine/1")
    np.testing.assert_array_equal(np.concatenate(finite), np.concatenate([answers[0], answers[2]]))
