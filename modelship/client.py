"""A small HTTP client for a modelship server (standard library + numpy): `Client(url).predict_image("cat.png")`.

The documented import is `modelship.client` (the base install has it: numpy and the standard library only).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from modelship.errors import ClientError
from modelship.options import CLIENT_TIMEOUT, CLIENT_URL


class Client:
    """Calls /predict and the KServe v2 endpoints of one server."""

    def __init__(self, url: str = CLIENT_URL, api_key: str | None = None, timeout: float = CLIENT_TIMEOUT):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if self.api_key:
            h["X-API-Key"] = self.api_key
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, dict(r.headers.items()), r.read()
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                message = json.loads(payload).get("error") or payload.decode()
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                message = payload.decode(errors="replace")
            raise ClientError(f"{method} {path}: HTTP {e.code}: {message}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach {self.url} ({reason}); is `modelship serve` running there?") from None

    def _json(self, method: str, path: str, doc: Any = None) -> Any:
        body = None if doc is None else json.dumps(doc).encode()
        _, _, data = self._request(method, path, body, {"Content-Type": "application/json"})
        return json.loads(data)

    def health(self) -> bool:
        """True once the server has warmed up."""
        try:
            self._request("GET", "/health")
            return True
        except ClientError as e:
            if e.status == 503:
                return False
            raise

    def info(self) -> dict[str, Any]:
        return self._json("GET", "/info")

    def predict_image(self, image: str | Path | bytes, top_k: int | None = None) -> dict[str, Any]:
        """Classify one PNG/JPEG (a path or its bytes): {"label", "index", "score", "top_k"}."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ClientError(f"image {path} does not exist", 400)
            image = path.read_bytes()
        doc: dict[str, Any] = {"image": base64.b64encode(image).decode()}
        if top_k is not None:
            doc["top_k"] = top_k
        return self._json("POST", "/predict", doc)

    def predict_tensor(self, x: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
        """Classify one preprocessed float tensor [C, H, W]."""
        doc: dict[str, Any] = {"inputs": np.asarray(x, np.float32).tolist()}
        if top_k is not None:
            doc["top_k"] = top_k
        return self._json("POST", "/predict", doc)

    def infer(
        self, model: str, batch: np.ndarray, binary: bool = True, input_name: str = "input", output_name: str = "logits"
    ) -> np.ndarray:
        """KServe v2 inference on a batch [N, C, H, W]; returns the logits [N, num_classes]. Works with any v2 server
        (modelship, Triton, KServe) that serves `model` with these tensor names."""
        x = np.ascontiguousarray(batch, dtype="<f4")
        tensor: dict[str, Any] = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
        wanted = [{"name": output_name, "parameters": {"binary_data": binary}}]
        if not binary:
            tensor["data"] = x.ravel().tolist()
            out = self._json("POST", f"/v2/models/{model}/infer", {"inputs": [tensor], "outputs": wanted})["outputs"][0]
            return np.asarray(out["data"], np.float32).reshape(out["shape"])
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        header = json.dumps({"inputs": [tensor], "outputs": wanted}).encode()
        _, headers, data = self._request(
            "POST",
            f"/v2/models/{model}/infer",
            header + x.tobytes(),
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        )
        n = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
        out = json.loads(data[:n])["outputs"][0]
        return np.frombuffer(data[n:], dtype="<f4").reshape(out["shape"])
