"""An API server's view of the models it serves: the model table (modelship.serving.control.table), and for each READY
version what validating and answering a request needs (its ServedModel, v2 metadata, JSON size limit).

`resolve(name, version)` is the routing rule: no version means the newest READY one (under a rollout, the serving
one); a version that exists but is not READY is 503 (loading, unloading: retry), one that does not exist 404, each
with a message naming what there is. `route` adds the rollout's share: which version answers a request without a
version, and which runs a copy of it (control.rollout).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelship.backends import PLATFORMS
from modelship.serving.control.table import READY, Reader, Rollout, Table, Version, kept_manifest, key_of
from modelship.serving.errors import RequestError
from modelship.serving.v2 import ServedModel

JSON_NUMBER_BYTES = 26  # the longest float32 in JSON, "-1.2345678e-38" at most, with room for ", " and exponent forms
JSON_ENVELOPE_BYTES = 1 << 16  # names, datatype, shape, parameters around the numbers
MESSAGE_ENVELOPE_BYTES = 1 << 16  # the same around a gRPC request's tensor bytes


@dataclass(frozen=True)
class Served:
    """One READY model version as an API server answers for it."""

    key: str
    version: str
    model: ServedModel
    manifest: dict[str, Any]  # without this machine's paths
    max_json_bytes: int  # the largest JSON body a v2 request can legitimately have
    max_message_bytes: int  # the largest gRPC ModelInfer request: its largest batch of FP32 and the envelope
    datatype: str


@dataclass(frozen=True)
class Pairing:
    """A request of a rollout that both versions run: the role of the version that answers it, and the other version
    (its partner), which runs a copy of it off the answer path. The rest of a model's requests go to the serving
    version as any request does: both versions' evidence comes from the requests they both ran."""

    rollout: Rollout
    role: str  # serving | candidate
    partner: Served
    bridge: tuple[np.ndarray, np.ndarray] | None = None  # renormalizes the input for the partner (see `bridge`)

    @classmethod
    def of(cls, rollout: Rollout, role: str, answering: Served, partner: Served) -> Pairing:
        return cls(rollout, role, partner, bridge(answering.manifest["preprocess"], partner.manifest["preprocess"]))

    def copied(self, x: np.ndarray) -> np.ndarray:
        """The request's input as the partner takes it."""
        if self.bridge is None:
            return x
        scale, shift = self.bridge
        return (x * scale + shift).astype(np.float32, copy=False)


def bridge(a: dict[str, Any], b: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel, the scale and shift that turn an input normalized by preprocess `a`'s mean and std into the same
    pixels normalized by `b`'s, or None when they normalize alike. Two trainings of one model measure their own mean
    and std on their own data: the same image must reach each version as its own preprocessing makes it, whether an
    API server preprocessed it (/predict) or the client did (a v2 tensor made for the version that answers)."""
    if a["mean"] == b["mean"] and a["std"] == b["std"]:
        return None
    ma, sa, mb, sb = (
        np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (a["mean"], a["std"], b["mean"], b["std"])
    )
    return sa / sb, (ma - mb) / sb


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without this machine's paths."""
    source = {k: v for k, v in manifest["source"].items() if k != "checkpoint"}
    return {**manifest, "source": source}


def served(entry: Version, backend: str, run_dir: str) -> Served:
    manifest = kept_manifest(run_dir, entry.key)  # the controller's copy: the folder may have left since
    model = ServedModel.from_manifest({**manifest, "name": entry.name}, max_batch=int(manifest.get("max_batch", 64)))
    c, h, w = model.shape
    artifact = manifest["artifacts"][backend]
    datatype = {"float32": "FP32", "float16": "FP16"}[artifact.get("io", manifest["input"]["dtype"])]
    numbers = model.max_batch * c * h * w
    json_bytes = numbers * JSON_NUMBER_BYTES + JSON_ENVELOPE_BYTES
    message_bytes = numbers * 4 + MESSAGE_ENVELOPE_BYTES
    return Served(entry.key, str(entry.version), model, public_manifest(manifest), json_bytes, message_bytes, datatype)


class Catalog:
    """The table as this process last read it, and the Served of each READY version (built once per version)."""

    def __init__(self, run_dir: str, backend: str):
        self.run_dir = run_dir
        self.reader = Reader(run_dir)
        self.backend = backend
        self.cache: dict[tuple[str, int], Served] = {}  # by version and the table generation that added it

    @property
    def table(self) -> Table:
        return self.reader.current()

    def names(self) -> list[str]:
        return self.table.names()

    def get(self, entry: Version) -> Served:
        """The Served of a version; built again when the version was added again (a folder published anew under the
        same number: another manifest)."""
        found = self.cache.get((entry.key, entry.added))
        if found is None:
            if len(self.cache) > 256:  # versions come and go for the life of the server
                live = self.table.versions
                self.cache = {k: v for k, v in self.cache.items() if k[0] in live and live[k[0]].added == k[1]}
            found = self.cache[(entry.key, entry.added)] = served(entry, self.backend, self.run_dir)
        return found

    def resolve(self, name: str, version: str | None = None) -> Served:
        """The version a request for `name` (and `version`, if given) goes to, or RequestError 404 / 503. A request
        this process's view cannot route reads the table again first: another API server may have seen a version
        turn READY up to REFRESH seconds before this one did."""
        try:
            return self._resolve(name, version)
        except RequestError:
            if not self.reader.reload():
                raise
        return self._resolve(name, version)

    def route(self, name: str, version: str | None, key: bytes | None = None) -> tuple[Served, Pairing | None]:
        """`resolve`, and for a request without a version of a model under a rollout, the rollout's share: in shadow
        the serving version answers and a sampled share is copied to the candidate; in canary the candidate answers
        its share (by the hash of `key`, the X-Canary-Key header, when the client sends one: the same key lands on
        the same side for the whole rollout) and the serving version runs a copy of those. Pairing None: an
        ordinary request."""
        r = self.table.rollouts.get(name) if version in (None, "") else None
        if r is None or not r.routes():
            return self.resolve(name, version), None
        versions = self.table.versions
        serving, candidate = versions.get(key_of(name, r.serving)), versions.get(key_of(name, r.candidate))
        if serving is None or candidate is None or serving.state != READY or candidate.state != READY:
            return self.resolve(name, version), None  # it is ending: the controller's next table says how
        if r.mode == "shadow":
            if random.random() < r.share:
                answering = self.get(serving)
                return answering, Pairing.of(r, "serving", answering, self.get(candidate))
            return self.get(serving), None
        if key:
            draw = int.from_bytes(hashlib.sha256(b"%d:%s" % (r.id, key)).digest()[:8], "big") / 2**64
        else:
            draw = random.random()
        if draw < r.share:
            answering = self.get(candidate)
            return answering, Pairing.of(r, "candidate", answering, self.get(serving))
        return self.get(serving), None

    def fresh(self) -> Table:
        """The table as it is now (for the index and readiness: a stale view would contradict another process's)."""
        self.reader.reload()
        return self.reader.table

    def _resolve(self, name: str, version: str | None) -> Served:
        table = self.table
        default = table.default(name) if version in (None, "") else None
        if default is not None:  # the common request: the newest READY version, nothing else to look at
            return self.get(default)
        versions = sorted((v for v in table.versions.values() if v.name == name), key=lambda v: v.version)
        if not versions:
            if name in table.known:
                raise RequestError(
                    f"model {name!r} is not loaded; POST /v2/repository/models/{name}/load loads it",
                    404,
                    grpc=f"model {name!r} is not loaded; RepositoryModelLoad loads it",
                )
            have = ", ".join(repr(n) for n in table.names()) or "none yet"
            raise RequestError(f"unknown model {name!r}; this server serves {have}", 404)
        if version in (None, ""):
            states = ", ".join(f"{v.version} {v.state}" for v in versions)
            raise RequestError(f"model {name!r} has no version ready ({states}); retry shortly", 503)
        match = next((v for v in versions if str(v.version) == version), None)
        if match is None:
            listed = ", ".join(repr(str(v.version)) for v in versions)
            raise RequestError(f"model {name!r} has no version {version!r}; its versions are {listed}", 404)
        if match.state != READY:
            why = f": {match.reason}" if match.reason else "; retry shortly, or leave out the version"
            raise RequestError(f"version {version} of model {name!r} is {match.state}{why}", 503)
        return self.get(match)

    def only(self) -> Served:
        """The model `/predict` answers for: the only one served, or RequestError naming the per-model route."""
        names = self.names()
        if not names and self.reader.reload():  # a miss reads the table again first, as `resolve` does
            names = self.names()
        if len(names) != 1:
            if not names:
                raise RequestError("no model is ready yet; retry shortly", 503)
            raise RequestError(
                f"this server serves {len(names)} models ({', '.join(names)}); POST /v2/models/{{name}}/predict", 400
            )
        return self.resolve(names[0])

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """The v2 model metadata: the versions that are READY, the platform, the tensors."""
        s = self.resolve(name, version)
        c, h, w = s.model.shape
        return {
            "name": name,
            "versions": [str(v.version) for v in self.table.ready(name)] if version is None else [s.version],
            "platform": PLATFORMS[self.backend],
            "inputs": [{"name": s.model.input_name, "datatype": s.datatype, "shape": [-1, c, h, w]}],
            "outputs": [{"name": s.model.output_name, "datatype": s.datatype, "shape": [-1, len(s.model.classes)]}],
        }
