"""The server as a web service: `/`, the OpenAPI document and its examples, clients that hang up, the v2 request
schema field by field, CORS, and the LitServe versions it agrees to run on."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from modelship.serving.compat import check
from modelship.serving.http_api.routes import ROUTES as TABLE
from tests.helpers import KEY, Server, running_server, scrape

ROUTES = {(r.path, m.lower()) for r in TABLE if r.doc is not None for m in r.methods if m != "HEAD"}


def test_root_says_what_is_served_and_litserve_own_routes_are_gone(server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    body = r.json()
    assert (body["project"], body["model"], body["backend"], body["ready"]) == ("modelship", "shapes-cnn", "onnx", True)
    assert body["links"]["docs"] == "/docs" and body["links"]["v2"] == "/v2/models/shapes-cnn"
    assert httpx.get(server.url + "/litserve/info").status_code == 404


def test_every_route_of_the_table_is_answered_by_its_handler(server: Server) -> None:
    """The route table drives dispatch: each route's path, with a served model's name, reaches a handler (FastAPI's
    or the Guard's), never FastAPI's 'no route'; and a path that is not in the table gets 404."""
    for route in TABLE:
        path = route.path.format(name="shapes-cnn", version="1")
        for method in route.methods:
            r = httpx.request(method, server.url + path, content=b"{}" if method == "POST" else None)
            assert r.status_code != 404 or "no route" not in r.text, (method, path, r.text)
    r = httpx.get(server.url + "/v2/models/shapes-cnn/infer/extra")
    assert r.status_code == 404 and r.json()["error"].startswith("no route /v2/models/shapes-cnn/infer/extra")


def test_openapi_describes_every_route_with_its_schemas(server: Server) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert listed == ROUTES
    schemas = doc["components"]["schemas"]
    refs = {m.group(1) for m in re.finditer(r'"#/components/schemas/([^"]+)"', json.dumps(doc))}
    assert refs <= set(schemas), refs - set(schemas)  # every reference resolves
    predict = doc["paths"]["/predict"]["post"]
    media = predict["requestBody"]["content"]
    assert set(media) == {"application/json", "multipart/form-data", "image/png", "image/jpeg"}
    assert media["multipart/form-data"]["schema"]["required"] == ["file"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert {"400", "413", "415", "504"} <= set(predict["responses"])
    assert set(schemas["Prediction"]["properties"]) == {"label", "index", "score", "top_k", "model_name",
                                                        "model_version"}  # fmt: skip
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2InferenceRequest")
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert "`shapes-cnn` version 1 (READY): 5 classes, input [N, 3, 32, 32]" in doc["info"]["description"]
    assert doc["info"]["title"] == "modelship: shapes-cnn"
    assert "Swagger UI" in httpx.get(server.url + "/docs").text


def test_the_documented_examples_work_when_pasted(server: Server) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    predict = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(predict) == {"image", "inputs"}
    for example in predict.values():
        r = httpx.post(server.url + "/predict", json=example["value"])
        assert r.status_code == 200, r.text
        assert r.json()["label"] in {"circle", "cross", "ring", "square", "triangle"}
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = httpx.post(server.url + "/v2/models/shapes-cnn/infer", json=infer)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 5] and r.json()["id"] == "example-1"


def hang_up(url: str, path: str, headers: str) -> None:
    """Send the head of a request and part of its body, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 100000\r\n\r\n".encode() + b'{"in')


def test_clients_that_hang_up_mid_body_are_499_not_server_errors(server: Server) -> None:
    before = scrape(server.url)
    for _ in range(100):
        hang_up(server.url, "/predict", "Content-Type: application/json\r\n")
        hang_up(server.url, "/v2/models/shapes-cnn/infer", "")
    deadline = time.monotonic() + 10
    key = 'modelship_requests_total{route="%s",status="499"}'
    while time.monotonic() < deadline:
        after = scrape(server.url)
        got = [after.get(key % r, 0) - before.get(key % r, 0) for r in ("/predict", "/v2/models/{name}/infer")]
        if got == [100, 100]:
            break
        time.sleep(0.1)
    assert got == [100, 100]
    errors = {k: v - before.get(k, 0) for k, v in after.items() if 'status="5' in k}
    assert not any(errors.values()), errors
    assert "Traceback" not in server.output() and "unhandled error" not in server.output()
    assert httpx.get(server.url + "/health").status_code == 200


def v2(**fields: object) -> dict:
    doc: dict = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    for path, value in fields.items():
        target, *keys = path.split("__")
        obj = doc
        if target == "input":
            obj = doc["inputs"][0]
        elif target == "output":
            doc.setdefault("outputs", [{"name": "logits"}])
            obj = doc["outputs"][0]
        key = keys[0] if keys else target
        if key == "whole":
            doc["inputs" if target == "input" else "outputs"][0] = value
        else:
            obj[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (v2(id={"a": 1}), "id must be a string, got an object"),
        (v2(id=7), "id must be a string, got a number"),
        (v2(parameters=[1]), "parameters must be an object of string, number or boolean values, got an array"),
        (v2(parameters={"x": {"y": 1}}), "parameters.x must be a string, number or boolean, got an object"),
        (v2(parameters={"binary_data_output": "yes"}), "parameters.binary_data_output must be a boolean, got a string"),
        ({"inputs": {"name": "input"}}, "inputs must be an array with one tensor object named 'input', got an object"),
        (v2(input__whole="input"), "inputs[0] must be an object, got a string"),
        (v2(input__name=3), "inputs[0].name must be a string, got a number"),
        (v2(input__datatype=None), "inputs[0].datatype must be a string, got null"),
        (v2(input__shape="1,3,32,32"), "inputs[0].shape must be an array of integers [N, 3, 32, 32]"),
        (v2(input__shape=[1, 3, 32, True]), "inputs[0].shape must be an array of integers"),
        (v2(input__parameters="binary"), "inputs[0].parameters must be an object"),
        (v2(input__extra=1), "unknown field(s) extra in inputs[0]; it has name, shape, datatype, parameters, data"),
        (v2(output__whole="logits"), "outputs[0] must be an object, got a string"),
        (v2(output__name=["logits"]), "outputs[0].name must be a string, got an array"),
        (
            v2(output__parameters={"binary_data": 1}),
            "outputs[0].parameters.binary_data must be a boolean, got a number",
        ),
        (dict(v2(), outputs={"name": "logits"}), "outputs must be an array of objects, got an object"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_v2_fields_of_the_wrong_json_type_are_400_naming_the_field(server: Server, doc: dict, message: str) -> None:
    r = httpx.post(server.url + "/v2/models/shapes-cnn/infer", json=doc)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_cors_lets_a_browser_app_call_with_its_key(tiny_bundle: Path, tmp_path: Path, server: Server) -> None:
    origin = "https://app.example.com"
    args = ("--cors-origin", origin, "--cors-origin", "http://localhost:3000")
    with running_server(tiny_bundle, *args, env={"MODELSHIP_API_KEY": KEY}, tmp=tmp_path) as s:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type,x-api-key"}  # fmt: skip
        r = httpx.options(s.url + "/predict", headers=preflight)  # a preflight carries no key
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == origin
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(s.url + "/predict", json={"inputs": [[[0.0] * 32] * 32] * 3},
                       headers={"Origin": origin, "X-API-Key": KEY})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = httpx.options(s.url + "/predict", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        assert httpx.get(s.url + "/docs").status_code == 200  # the docs open without the key
        assert httpx.get(s.url + "/openapi.json").json()["security"] == [{"apiKey": []}, {"bearer": []}]
    # off by default: no CORS headers at all
    r = httpx.get(server.url + "/health", headers={"Origin": origin})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("version", ["0.2.18", "0.2.20", "0.3.0", "1.0.0"])
def test_serve_refuses_a_litserve_outside_the_tested_range(
    tiny_bundle: Path, cli, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(check.ls, "__version__", version)
    r = cli("serve", tiny_bundle)
    assert r.code == 2
    assert r.last_line == (
        f"modelship serve: error: litserve {version} is installed, but modelship serve is tested with "
        "litserve==0.2.19 (it relies on LitServe internals that change between releases); "
        "pip install 'litserve==0.2.19'"
    )
    check.check_version("0.2.19")


def test_serve_refuses_a_litserve_whose_overridden_hook_moved(
    tiny_bundle: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = check.mismatch(((check.ls.LitServer, "launch_worker_renamed", ("self",), None),))
    monkeypatch.setattr(check, "MISMATCH", found)
    r = cli("serve", tiny_bundle)
    assert r.code == 2 and r.last_line == (
        f"modelship serve: error: litserve {check.ls.__version__}: litserve.server.LitServer.launch_worker_renamed "
        "is missing; modelship serve overrides it and needs litserve==0.2.19"
    )


def test_every_overridden_litserve_name_is_checked_for_its_signature_and_its_caller() -> None:
    assert check.MISMATCH is None  # the pinned LitServe fits every override

    class Moved:  # what a LitServe release that renamed or reshaped a hook looks like
        def run(self) -> None:
            self.launch(1)

        def launch(self, lit_api, worker_id, extra) -> None: ...

        def setup(self) -> None: ...

    assert check.mismatch(((Moved, "gone", ("self",), None),)).startswith(
        f"litserve {check.ls.__version__}: tests.serving.test_web."
    )
    assert "Moved.gone is missing; modelship serve overrides it and needs litserve==0.2.19" in check.mismatch(
        ((Moved, "gone", ("self",), None),)
    )
    assert "Moved.launch takes (self, lit_api, worker_id, extra), expected (self, lit_api, worker_id)" in (
        check.mismatch(((Moved, "launch", ("self", "lit_api", "worker_id"), None),)) or ""
    )
    assert "Moved.setup is no longer called by " in (check.mismatch(((Moved, "setup", ("self",), Moved.run),)) or "")
    assert check.mismatch(((Moved, "launch", ("self", "lit_api", "worker_id", "extra"), Moved.run),)) is None


def test_every_litserve_attribute_modelship_reads_is_checked() -> None:
    assert check.missing_attribute(check.ATTRIBUTES) is None  # the pinned LitServe sets every one

    class Renamed(check.ls.LitServer):  # a release whose __init__ no longer sets an attribute modelship reads
        pass

    found = check.missing_attribute(((Renamed, ("_shutdown_event", "_stop_event_renamed")),)) or ""
    assert found.startswith(f"litserve {check.ls.__version__}: tests.serving.test_web.") and found.endswith(
        "Renamed no longer sets _stop_event_renamed; modelship serve reads it and needs litserve==0.2.19"
    )
