"""Request parsing and response formatting, without a server: every malformed request names what was wrong."""

from __future__ import annotations

import base64
import gzip
import io
import json

import numpy as np
import pytest
from PIL import Image

from modelship.preprocess import Preprocess, preprocess_image
from modelship.scores import prediction
from modelship.serving.errors import RequestError
from modelship.serving.http_api.codec import V2Request, decompress, parse_predict_json, parse_v2_infer, v2_response
from modelship.serving.http_api.routes import label as route_label
from modelship.serving.v2 import ServedModel

SPEC = ServedModel(
    name="m", classes=("a", "b", "c"), input_name="input", output_name="logits", shape=(3, 4, 4),
    preprocess=Preprocess(size=(4, 4), channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)), max_batch=8,
)  # fmt: skip


def png_bytes(size: tuple[int, int] = (6, 5), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def predict_tensor(raw: bytes) -> tuple[np.ndarray, int]:
    """What the server does with a JSON /predict body: parse, then (for an image) decode."""
    req = parse_predict_json(raw, SPEC)
    return req.to_tensor(SPEC), req.top_k


def test_image_goes_through_the_manifest_preprocessing() -> None:
    data = png_bytes()
    x, top_k = predict_tensor(body({"image": base64.b64encode(data).decode(), "top_k": 2}))
    expected = preprocess_image(Image.open(io.BytesIO(data)), SPEC.preprocess)
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32 and top_k == 2
    assert np.array_equal(x[0], expected)


def test_inputs_tensor_and_default_top_k() -> None:
    value = np.arange(48, dtype=np.float32).reshape(3, 4, 4)
    x, top_k = predict_tensor(body({"inputs": value.tolist()}))
    assert np.array_equal(x[0], value) and top_k == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "the request body is empty; expected JSON"),
        (b"{not json", "the request body is not valid JSON"),
        (body([1, 2]), "expected a JSON object"),
        (body({"imgae": "x"}), "unknown field(s) imgae; expected"),
        (body({}), "give exactly one of image or inputs"),
        (body({"image": "", "inputs": []}), "give exactly one of image or inputs"),
        (body({"image": 5}), "image must be a base64 string, got int"),
        (body({"image": "%%%not-base64"}), "image is not valid base64"),
        (body({"image": base64.b64encode(b"hello world").decode()}), "image is not an image PIL can read"),
        (body({"image": base64.b64encode(png_bytes((64, 64))[:200]).decode()}), "could not be decoded"),
        (body({"inputs": "0.5"}), "inputs must be a list of numbers, got str"),
        (body({"inputs": [[["0.1"] * 4] * 4] * 3}), "inputs must hold numbers only; found strings"),
        (body({"inputs": [[[True] * 4] * 4] * 3}), "inputs must hold numbers only; found booleans"),
        (body({"inputs": [[[None] * 4] * 4] * 3}), "inputs must hold numbers only; found non-numbers"),
        (body({"inputs": [[[0.0] * 4] * 4] * 2}), "inputs has shape [2, 4, 4]; expected [3, 4, 4]"),
        (body({"inputs": [[[0.0] * 4] * 4] * 2 + [[[0.0] * 3] * 4]}), "inputs is ragged"),
        (body({"inputs": [0.0] * 48}), "inputs has shape [48]; expected [3, 4, 4]"),
        (body({"inputs": [[[0.0] * 4] * 4] * 3, "top_k": 0}), "top_k must be an integer from 1 to 3"),
        (body({"inputs": [[[0.0] * 4] * 4] * 3, "top_k": True}), "top_k must be an integer from 1 to 3"),
        (body({"inputs": [[[0.0] * 4] * 4] * 3, "top_k": "two"}), "top_k must be an integer from 1 to 3"),
    ],
)
def test_bad_predict_requests(raw: bytes, message: str) -> None:
    with pytest.raises(RequestError) as e:
        predict_tensor(raw)
    assert e.value.status == 400 and message in e.value.message


def test_huge_images_are_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, "PNG")  # 48 Mpixel of zeros compress to a few kB
    with pytest.raises(RequestError) as e:
        predict_tensor(body({"image": base64.b64encode(buf.getvalue()).decode()}))
    assert e.value.status == 413 and "8000x6000 pixels" in e.value.message


def test_predict_response_is_a_ranked_softmax() -> None:
    r = prediction(np.array([0.0, 2.0, 1.0], np.float32), SPEC.classes, top_k=2)
    assert (r["label"], r["index"]) == ("b", 1)
    assert [t["label"] for t in r["top_k"]] == ["b", "c"]
    p = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert r["score"] == pytest.approx(p[1]) and r["top_k"][1]["score"] == pytest.approx(p[2])


def v2_doc(shape: list[int], **tensor: object) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, **tensor}]}


def test_v2_json_flat_and_nested_data() -> None:
    x = np.arange(2 * 48, dtype=np.float32).reshape(2, 3, 4, 4)
    for data in (x.ravel().tolist(), x.tolist()):
        req = parse_v2_infer(body({**v2_doc([2, 3, 4, 4], data=data), "id": "r1"}), None, SPEC)
        assert np.array_equal(req.tensor, x) and req.id == "r1" and not req.binary_output


def test_v2_unknown_top_level_fields_are_ignored_as_tritons_and_kserves_servers_do() -> None:
    """KServe's SDK sends model_name and model_version in the body; Triton and KServe ignore such fields."""
    doc = v2_doc([1, 3, 4, 4], data=[0] * 48) | {"model_name": "m", "model_version": "1", "foo": {"bar": 1}}
    assert parse_v2_infer(body(doc), None, SPEC).tensor.shape == (1, 3, 4, 4)


def test_v2_binary_extension() -> None:
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype("<f4")
    header = body(
        {
            **v2_doc([3, 3, 4, 4], parameters={"binary_data_size": x.nbytes}),
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    req = parse_v2_infer(header + x.tobytes(), str(len(header)), SPEC)
    assert np.array_equal(req.tensor, x) and req.binary_output and req.outputs == ["logits"]


@pytest.mark.parametrize(
    ("doc", "binary", "message"),
    [
        ({"inputs": []}, b"", "inputs must be a list with one tensor object named 'input'"),
        (
            v2_doc([1, 3, 4, 4], data=[0] * 48) | {"outputs": [{"name": "logits", "colour": 1}]},
            b"",
            "unknown field(s) colour in outputs[0]",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0] * 48}]},
            b"",
            "unknown input 'x'; this model's input is 'input'",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3, 4, 4], "data": [0] * 48}]},
            b"",
            "input datatype 'FP64' is not supported; expected FP32",
        ),
        (v2_doc([1, 3, 4], data=[0] * 12), b"", "input shape [1, 3, 4] does not fit the model; expected [N, 3, 4, 4]"),
        (v2_doc([1, 1, 4, 4], data=[0] * 16), b"", "expected [N, 3, 4, 4]"),
        (v2_doc([9, 3, 4, 4], data=[0] * 432), b"", "input batch of 9 is over this server's limit of 8"),
        (v2_doc([1, 3, 4, 4], data=[0] * 47), b"", "input data has shape [47]; expected [1, 3, 4, 4]"),
        (v2_doc([1, 3, 4, 4], data=["a"] * 48), b"", "input data must hold numbers only; found strings"),
        (v2_doc([1, 3, 4, 4]), b"", "input needs data"),
        (
            v2_doc([1, 3, 4, 4], parameters={"binary_data_size": 100}),
            b"\0" * 100,
            "binary input is 100 bytes; shape [1, 3, 4, 4] FP32 needs 192 bytes",
        ),
        (
            v2_doc([1, 3, 4, 4], data=[0] * 48) | {"outputs": [{"name": "probs"}]},
            b"",
            "unknown output 'probs'; this model's output is 'logits'",
        ),
    ],
)
def test_bad_v2_requests(doc: dict, binary: bytes, message: str) -> None:
    header = body(doc)
    with pytest.raises(RequestError) as e:
        parse_v2_infer(header + binary, str(len(header)) if binary else None, SPEC)
    assert e.value.status == 400 and message in e.value.message


def test_v2_header_length_must_fit() -> None:
    with pytest.raises(RequestError, match="Inference-Header-Content-Length 999 does not fit a body of 2 bytes"):
        parse_v2_infer(b"{}", "999", SPEC)
    with pytest.raises(RequestError, match="must be an integer, got 'ten'"):
        parse_v2_infer(b"{}", "ten", SPEC)


def test_v2_responses_json_and_binary() -> None:
    logits = np.array([[1.5, -2.0, 0.25]], np.float32)
    content, headers = v2_response(logits, V2Request(np.zeros(1), id="7"), SPEC, "1")
    doc = json.loads(content)
    assert doc == {
        "model_name": "m",
        "model_version": "1",
        "id": "7",
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 3], "data": [1.5, -2.0, 0.25]}],
    }
    content, headers = v2_response(logits, V2Request(np.zeros(1), binary_output=True), SPEC, "1")
    n = int(headers["inference-header-content-length"])
    assert json.loads(content[:n])["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert np.array_equal(np.frombuffer(content[n:], "<f4").reshape(1, 3), logits)


def test_compressed_requests_and_bombs() -> None:
    raw = b"x" * 1000
    assert decompress(gzip.compress(raw), "gzip", 10_000) == raw
    with pytest.raises(RequestError) as e:
        decompress(gzip.compress(b"\0" * 5_000_000), "gzip", 1 << 20)
    assert e.value.status == 413
    with pytest.raises(RequestError) as e:
        decompress(raw, "br", 10_000)
    assert e.value.status == 415


def test_metric_routes_are_templates() -> None:
    assert route_label("/predict") == "/predict"
    assert route_label("/v2/models/anything/infer") == "/v2/models/{name}/infer"
    assert route_label("/v2/models/x/versions/1/ready") == "/v2/models/{name}/ready"
    assert route_label("/v2/models/x") == "/v2/models/{name}"
    assert route_label("/wp-admin.php") == "other"
