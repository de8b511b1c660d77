"""KServe v2 over gRPC (`--grpc-port`), tested with tritonclient.grpc (sync and aio) on real servers.

One server for most tests: a repository of `shapes-cnn` (the tiny cnn) and `affine` under explicit control, with an API
key, both protocols on. Every answer is checked against what HTTP v2 answers for the same input.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from modelship.client import ClientError
from modelship.files import sha256_file
from modelship.grpc_client import GRPCClient, connect
from modelship.protos import health_pb2, inference_pb2
from tests.helpers import KEY, Server, busy_port, free_port, run_modelship, running_server, scrape, wait_ready
from tests.serving.test_repository import make_repo
from tests.serving.test_server import val_png

AUTH = {"x-api-key": KEY}
SHAPE = (3, 32, 32)
MODEL = "shapes-cnn"  # the tiny bundle's own name, as `predict --bundle` asks for it


@dataclass
class Both:
    server: Server
    grpc: str  # HOST:PORT

    def client(self) -> tg.InferenceServerClient:
        return tg.InferenceServerClient(self.grpc)

    def http(self) -> th.InferenceServerClient:
        return th.InferenceServerClient(self.server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, affine_bundle: Path) -> Iterator[Both]:
    tmp = tmp_path_factory.mktemp("grpc")
    repo = make_repo(tmp / "repo", {"shapes-cnn": [tiny_bundle], "affine": [affine_bundle], "broken": [affine_bundle]})
    broken = repo / "broken" / "1"  # hashes that match a file no runtime can load: it fails on the workers
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["artifacts"]["onnx"].update(sha256=sha256_file(broken / "model.onnx"), bytes=17)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    port = free_port()
    args = ("--grpc-port", str(port), "--model-control", "explicit", "--load-model", "shapes-cnn", "--api-key", KEY)
    with running_server(repo, *args, tmp=tmp) as s:
        yield Both(s, f"127.0.0.1:{port}")


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def grpc_infer(client: tg.InferenceServerClient, x: np.ndarray, model: str = MODEL, headers=AUTH,  # type: ignore[no-untyped-def]
               **kwargs) -> tg.InferResult:  # fmt: skip
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return client.infer(model, [i], outputs=[tg.InferRequestedOutput("logits")], headers=headers, **kwargs)


def http_logits(both: Both, x: np.ndarray) -> np.ndarray:
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    return both.http().infer(MODEL, [i], headers=dict(AUTH)).as_numpy("logits")  # (it adds headers to the dict)


def grpc_error(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as e:
        call()
    return str(e.value.status()), str(e.value.message())


def raw_call(both: Both, method: str, payload: bytes, metadata=AUTH) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    """A call with bytes of our choosing (a malformed message no client library would send)."""
    with grpc.insecure_channel(both.grpc) as channel:
        stub = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as e:
            stub(payload, metadata=tuple(metadata.items()), timeout=30)
    return e.value


# ------------------------------------------------------------------------------------------------ the proto


def fields(pool_file: bytes) -> dict[str, dict[int, tuple[str, int, int]]]:
    """{message full name: {field number: (name, type, label)}} of a serialized FileDescriptorProto."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(pool_file)
    out: dict[str, dict[int, tuple[str, int, int]]] = {}

    def walk(prefix: str, messages) -> None:  # type: ignore[no-untyped-def]
        for m in messages:
            name = f"{prefix}.{m.name}"
            out[name] = {f.number: (f.name, f.type, f.label) for f in m.field}
            walk(name, m.nested_type)

    walk(proto.package, proto.message_type)
    return out


def enums(pool_file: bytes) -> dict[str, dict[str, int]]:
    """{enum full name: {value name: number}} of a serialized FileDescriptorProto, nested ones included."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(pool_file)
    out: dict[str, dict[str, int]] = {}

    def walk(prefix: str, messages, found) -> None:  # type: ignore[no-untyped-def]
        for e in found:
            out[f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}
        for m in messages:
            walk(f"{prefix}.{m.name}", m.nested_type, m.enum_type)

    walk(proto.package, proto.message_type, proto.enum_type)
    return out


def test_every_message_is_wire_compatible_with_tritonclients_proto() -> None:
    """Field for field (number, name, type, label), and every enum value, against tritonclient's grpc_service.proto
    and model_config.proto: a message here may have fewer fields than Triton's, never other ones."""
    ours = fields(inference_pb2.DESCRIPTOR.serialized_pb)
    triton = fields(service_pb2.DESCRIPTOR.serialized_pb) | fields(model_config_pb2.DESCRIPTOR.serialized_pb)
    assert len(ours) >= 45
    for name, numbered in ours.items():
        assert name in triton, name
        for number, field in numbered.items():
            assert triton[name].get(number) == field, (name, number)
    triton_enums = enums(service_pb2.DESCRIPTOR.serialized_pb) | enums(model_config_pb2.DESCRIPTOR.serialized_pb)
    for name, values in enums(inference_pb2.DESCRIPTOR.serialized_pb).items():
        assert values.items() <= triton_enums[name].items(), name
    # the calls tritonclient makes, at the paths it makes them, streaming where it streams
    methods = {m.name: m for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    for name, method in inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name.items():
        theirs = methods[name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            theirs.input_type.full_name, theirs.output_type.full_name
        ), name  # fmt: skip
        assert (method.client_streaming, method.server_streaming) == (theirs.client_streaming, theirs.server_streaming)


def test_the_checked_in_protobuf_code_is_what_the_protos_generate() -> None:
    pytest.importorskip("grpc_tools")
    from modelship.protos import generate

    for name, text in generate.generated().items():
        assert (generate.HERE / name).read_text() == text, f"{name} is stale: python -m {generate.__name__}"


# ------------------------------------------------------------------------------------------------ every call


def test_every_call_answers_as_http_v2_does(both: Both) -> None:
    client, http = both.client(), both.http()
    assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health/*
    assert client.is_model_ready(MODEL, headers=AUTH) and client.is_model_ready(MODEL, "1", headers=AUTH)
    meta = client.get_server_metadata(headers=AUTH, as_json=True)
    served = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
    assert (meta["name"], meta["extensions"]) == ("modelship", served)
    assert meta["version"] == http.get_server_metadata(headers=AUTH)["version"]
    model = client.get_model_metadata(MODEL, headers=AUTH, as_json=True)
    expected = http.get_model_metadata(MODEL, headers=AUTH)
    for tensor in model["inputs"] + model["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 as JSON strings
    assert model == expected
    index = client.get_model_repository_index(headers=AUTH, as_json=True)["models"]
    assert [(m["name"], m.get("version", ""), m["state"]) for m in index] == [
        (m["name"], m["version"], m["state"]) for m in http.get_model_repository_index(headers=AUTH)
    ] == [("affine", "", "UNAVAILABLE"), ("broken", "", "UNAVAILABLE"), (MODEL, "1", "READY")]  # fmt: skip
    # Triton's extensions that are not served (shared memory, trace, logging): grpc's own UNIMPLEMENTED
    assert grpc_error(lambda: client.get_system_shared_memory_status(headers=AUTH))[0] == "StatusCode.UNIMPLEMENTED"
    assert grpc_error(lambda: client.get_log_settings(headers=AUTH))[0] == "StatusCode.UNIMPLEMENTED"


def test_model_infer_equals_http_v2_raw_and_typed(both: Both) -> None:
    x = batch(3)
    expected = http_logits(both, x)
    r = grpc_infer(both.client(), x, request_id="req-7")
    assert np.array_equal(r.as_numpy("logits"), expected)
    response = r.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "req-7")
    typed = inference_pb2.ModelInferRequest(model_name=MODEL, model_version="1")  # fp32_contents, not raw
    typed.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel())
    with grpc.insecure_channel(both.grpc) as channel:
        stub = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=inference_pb2.ModelInferRequest.SerializeToString,
                                   response_deserializer=inference_pb2.ModelInferResponse.FromString)  # fmt: skip
        reply = stub(typed, metadata=tuple(AUTH.items()))
    assert list(reply.outputs[0].shape) == [3, 5]
    assert np.array_equal(np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 5), expected)


def test_the_aio_client_makes_every_call(both: Both) -> None:
    async def calls() -> None:
        client = tga.InferenceServerClient(both.grpc)
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(MODEL, headers=AUTH)
            assert (await client.get_server_metadata(headers=AUTH)).name == "modelship"
            assert (await client.get_model_metadata(MODEL, headers=AUTH)).platform == "onnxruntime_onnx"
            index = await client.get_model_repository_index(headers=AUTH)
            assert [m.name for m in index.models] == ["affine", "broken", MODEL]
            xs = [batch(2, seed) for seed in range(8)]
            inputs = []
            for x in xs:
                inputs.append(tga.InferInput("input", list(x.shape), "FP32"))
                inputs[-1].set_data_from_numpy(x)
            answers = await asyncio.gather(*(client.infer(MODEL, [i], headers=AUTH) for i in inputs))
            for x, r in zip(xs, answers, strict=True):  # concurrent calls, batched together, each its own rows
                assert np.array_equal(r.as_numpy("logits"), http_logits(both, x))
            await client.load_model("affine", headers=AUTH)
            assert await client.is_model_ready("affine", headers=AUTH)
            await client.unload_model("affine", headers=AUTH)
            assert not await client.is_model_ready("affine", headers=AUTH)
        finally:
            await client.close()

    asyncio.run(calls())


def test_load_and_unload_over_grpc(both: Both) -> None:
    client = both.client()
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    i = tg.InferInput("input", [2, 1, 2, 2], "FP32")
    i.set_data_from_numpy(x)
    status, message = grpc_error(lambda: client.infer("affine", [i], headers=AUTH))
    assert status == "StatusCode.NOT_FOUND" and "model 'affine' is not loaded" in message
    client.load_model("affine", headers=AUTH)  # answered once loaded on every worker
    assert client.is_model_ready("affine", headers=AUTH)
    logits = client.infer("affine", [i], headers=AUTH).as_numpy("logits")
    assert np.allclose(logits, 2 * x.reshape(2, -1) + 1)  # the affine bundle: 2x + 1
    client.unload_model("affine", headers=AUTH)
    states = {m.name: m.state for m in client.get_model_repository_index(headers=AUTH).models}
    assert states == {"affine": "UNAVAILABLE", "broken": "UNAVAILABLE", MODEL: "READY"}
    assert grpc_error(lambda: client.load_model("nothing", headers=AUTH))[0] == "StatusCode.NOT_FOUND"
    # a version that failed to load is UNAVAILABLE, with the reason, and never serves
    assert grpc_error(lambda: client.load_model("broken", headers=AUTH))[1] == (
        "failed to load 'broken': onnx artifact model.onnx: not an ONNX file (ONNX Runtime: [ONNXRuntimeError] : 7 : "
        "INVALID_PROTOBUF : Load model from model.onnx failed:Protobuf parsing failed.)"
    )
    (row,) = [m for m in client.get_model_repository_index(headers=AUTH).models if m.name == "broken"]
    assert (row.version, row.state) == ("1", "UNAVAILABLE") and row.reason
    status, message = grpc_error(lambda: client.infer("broken", [i], model_version="1", headers=AUTH))
    assert status == "StatusCode.UNAVAILABLE" and "version 1 of model 'broken' is UNAVAILABLE: " in message
    status, message = grpc_error(lambda: client.infer("broken", [i], headers=AUTH))
    assert status == "StatusCode.UNAVAILABLE" and "model 'broken' has no version ready (1 UNAVAILABLE)" in message


# ------------------------------------------------------------------------------------------------ errors


def test_every_mistake_is_a_status_code_naming_it_and_fails_no_one_else(both: Both) -> None:
    client = both.client()
    limit = json.loads((both.server.log.parent / "repo" / MODEL / "1" / "manifest.json").read_text())["max_batch"]
    ok = batch(1)
    cases = [
        (lambda: grpc_infer(client, ok, model="nope"), "NOT_FOUND", "unknown model 'nope'; this server serves"),
        (lambda: grpc_infer(client, ok, model_version="9"), "NOT_FOUND", "model 'shapes-cnn' has no version '9'"),
        (lambda: grpc_infer(client, batch(1)[:, :1]), "INVALID_ARGUMENT", "input shape [1, 1, 32, 32] does not fit"),
        (lambda: grpc_infer(client, batch(limit + 1)), "INVALID_ARGUMENT",
         f"input batch of {limit + 1} is over this server's limit of {limit}"),
        (lambda: grpc_infer(client, np.full((1, *SHAPE), np.nan, np.float32)), "INVALID_ARGUMENT",
         "contains NaN or infinity"),
        (lambda: client.infer(MODEL, [tg.InferInput("input", [1, *SHAPE], "FP64").set_data_from_numpy(
            ok.astype(np.float64))], headers=AUTH), "INVALID_ARGUMENT",
         "input datatype 'FP64' is not supported; expected FP32"),
        (lambda: client.infer(MODEL, [tg.InferInput("image", [1, *SHAPE], "FP32").set_data_from_numpy(ok)],
                              headers=AUTH), "INVALID_ARGUMENT", "unknown input 'image'; this model's input is"),
        (lambda: client.infer(MODEL, [tg.InferInput("input", [1, *SHAPE], "FP32").set_data_from_numpy(ok)],
                              outputs=[tg.InferRequestedOutput("probs")], headers=AUTH),
         "INVALID_ARGUMENT", "unknown output 'probs'; this model's output is 'logits'"),
        (lambda: grpc_infer(tg.InferenceServerClient(both.grpc), ok, headers={}), "UNAUTHENTICATED",
         "missing or wrong API key"),
        (lambda: client.get_model_metadata(MODEL, headers={"x-api-key": "wrong"}), "UNAUTHENTICATED",
         "missing or wrong API key"),
    ]  # fmt: skip
    with ThreadPoolExecutor(4) as pool:  # good requests all the while: a bad one never fails their batch
        good = [pool.submit(grpc_infer, both.client(), batch(2, seed)) for seed in range(40)]
        for call, code, message in cases:
            status, text = grpc_error(call)
            assert (status, message in text) == (f"StatusCode.{code}", True), text
        assert all(f.result().as_numpy("logits").shape == (2, 5) for f in good)
    # bytes no client would send: a malformed message, raw bytes that do not fit the shape, both kinds of contents
    e = raw_call(both, "ModelInfer", b"\x0a\xff\xff\xff")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "ModelInferRequest message cannot be parsed" in e.details()
    r = inference_pb2.ModelInferRequest(model_name=MODEL)
    r.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
    r.raw_input_contents.append(b"\0" * 100)
    e = raw_call(both, "ModelInfer", r.SerializeToString())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "raw_input_contents[0] is 100 bytes; shape [1, 3, 32, 32] FP32 needs 12288 bytes"
    r.inputs[0].contents.fp32_contents.append(1.0)
    e = raw_call(both, "ModelInfer", r.SerializeToString())
    assert e.details() == "input has both raw_input_contents and contents; send one"
    assert both.server.proc.poll() is None and both.client().is_server_ready()


def test_requests_over_the_size_limits_are_resource_exhausted(both: Both) -> None:
    r = inference_pb2.ModelInferRequest(model_name=MODEL)
    r.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
    r.raw_input_contents.append(b"\0" * (1 << 20))  # over the model's largest batch, under --max-payload-mb
    e = raw_call(both, "ModelInfer", r.SerializeToString())
    assert (
        e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "byte limit for model 'shapes-cnn' (its largest batch" in (e.details())
    )
    r.raw_input_contents[0] = b"\0" * (17 << 20)  # over --max-payload-mb (16): grpc refuses it before it is parsed
    e = raw_call(both, "ModelInfer", r.SerializeToString())
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.details()
    assert both.client().is_server_ready()


# ------------------------------------------------------------------------------------------------ health, metrics


def test_grpc_health_for_kubernetes_probes_needs_no_key(both: Both) -> None:
    with grpc.insecure_channel(both.grpc) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)  # fmt: skip
        serving = health_pb2.HealthCheckResponse.SERVING
        assert check(health_pb2.HealthCheckRequest()).status == serving
        assert check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")).status == serving
        assert check(health_pb2.HealthCheckRequest(service=MODEL)).status == serving
        with pytest.raises(grpc.RpcError) as e:
            check(health_pb2.HealthCheckRequest(service="nope"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)  # fmt: skip
        stream = watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(stream).status == serving
        stream.cancel()


def test_metrics_count_grpc_calls_by_method_code_and_protocol(both: Both) -> None:
    grpc_infer(both.client(), batch(1))
    raw_call(both, "ModelInfer", b"\x0a\xff")
    metrics = scrape(both.server.url, headers=AUTH)
    assert metrics['modelship_inferences_total{model="shapes-cnn",protocol="grpc",version="1"}'] >= 1
    method = "/inference.GRPCInferenceService/ModelInfer"
    assert metrics[f'modelship_grpc_requests_total{{code="OK",method="{method}"}}'] >= 1
    assert metrics[f'modelship_grpc_requests_total{{code="INVALID_ARGUMENT",method="{method}"}}'] >= 1


# ------------------------------------------------------------------------------------------------ processes


def listening(port: int, pids: list[int]) -> list[int]:
    """Those of `pids` that hold a listening socket on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                inodes.add(f"socket:[{f[9]}]")
    found = []
    for pid in pids:
        try:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if held & inodes:
            found.append(pid)
    return found


@pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["workers", "in-process"])
def test_every_api_server_serves_grpc_and_a_replacement_does_too(tiny_bundle: Path, tmp_path: Path, mode) -> None:
    port = free_port()
    with running_server(tiny_bundle, "--grpc-port", str(port), *mode, tmp=tmp_path) as s:
        client = tg.InferenceServerClient(f"127.0.0.1:{port}")
        servers = s.api_servers()
        assert len(servers) == 2
        deadline = time.monotonic() + 30  # each binds the gRPC port as it starts (HTTP may be up on one already)
        while listening(port, servers) != servers:  # one SO_REUSEPORT socket each
            assert time.monotonic() < deadline, s.output()[-3000:]
            time.sleep(0.1)
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(listening(port, s.api_servers())) < 2 or set(s.api_servers()) & set(servers):
            assert time.monotonic() < deadline, s.output()[-3000:]
            time.sleep(0.1)
        wait_ready(s.url, s.proc, s.log, [])
        x = batch(2)
        i = tg.InferInput("input", [2, *SHAPE], "FP32")
        i.set_data_from_numpy(x)
        assert [client.infer("shapes-cnn", [i]).as_numpy("logits").shape for _ in range(6)] == [(2, 5)] * 6


def test_sigterm_answers_the_grpc_calls_in_flight_and_exits_0(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    # a long batch window keeps the calls in flight when the signal arrives
    with running_server(tiny_bundle, "--grpc-port", str(port), "--batch-timeout", "1.0", "--max-batch-size", "64",
                        tmp=tmp_path) as s:  # fmt: skip

        def one(seed: int) -> tuple[int, int]:
            i = tg.InferInput("input", [1, *SHAPE], "FP32")
            i.set_data_from_numpy(batch(1, seed))
            return tg.InferenceServerClient(f"127.0.0.1:{port}").infer("shapes-cnn", [i]).as_numpy("logits").shape

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)  # fmt: skip
        statuses = watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, seed) for seed in range(8)]
            time.sleep(0.5)
            s.proc.send_signal(signal.SIGTERM)
            assert [f.result() for f in futures] == [(1, 5)] * 8
        # an open health watch hears NOT_SERVING and ends: it does not hold the drain for the graceful timeout
        assert [r.status for r in statuses] == [health_pb2.HealthCheckResponse.NOT_SERVING]
        channel.close()
        started = time.monotonic()
        assert s.proc.wait(timeout=40) == 0 and time.monotonic() - started < 15
        assert "Traceback" not in s.output()


def test_predict_over_grpc_matches_http(both: Both, data_dir: Path, tiny_bundle: Path) -> None:
    png = val_png(data_dir)
    common = ("predict", str(png), "--bundle", str(tiny_bundle), "--format", "jsonl", "--api-key", KEY)
    over_grpc = run_modelship(*common, "--url", f"grpc://{both.grpc}")
    over_http = run_modelship(*common, "--url", both.server.url)
    assert over_grpc.code == 0 and over_http.code == 0, over_grpc.err
    assert json.loads(over_grpc.out)["path"] == str(png)
    assert json.loads(over_grpc.out) == json.loads(over_http.out)
    r = run_modelship("predict", str(png), "--url", f"grpc://{both.grpc}")
    assert r.code == 2 and "needs --bundle: gRPC carries tensors" in r.last_line
    r = run_modelship(*common, "--url", f"grpc://127.0.0.1:{free_port()}", "--timeout", "3")
    assert r.code == 1 and "cannot reach grpc://127.0.0.1:" in r.last_line


def test_the_python_client_speaks_grpc(both: Both) -> None:
    client = connect(f"grpc://{both.grpc}", KEY)
    assert isinstance(client, GRPCClient) and client.health()
    x = batch(2, seed=3)
    expected = http_logits(both, x)
    assert np.array_equal(client.infer(MODEL, x), expected)
    assert np.array_equal(client.infer(MODEL, x, binary=False), expected)  # typed fp32_contents
    with pytest.raises(ClientError) as e:
        client.infer("nope", x)
    assert (e.value.status, e.value.exit_code) == (404, 2) and "NOT_FOUND: unknown model 'nope'" in str(e.value)
    client.close()
    with pytest.raises(ClientError) as e:
        connect("grpc://127.0.0.1")
    assert "is not a gRPC address; expected grpc://HOST:PORT" in str(e.value)


def test_serve_refuses_a_busy_grpc_port_and_a_port_twice(tiny_bundle: Path, cli) -> None:
    with busy_port() as port:
        r = cli("serve", tiny_bundle, "--grpc-port", str(port))
    assert r.code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.last_line and "Pick --grpc-port" in r.last_line
    r = cli("serve", tiny_bundle, "--port", "8123", "--grpc-port", "8123")
    assert r.code == 2 and "--grpc-port must differ from --port (both are 8123)" in r.last_line
