"""`modelship triton`: a bundle as an NVIDIA Triton model repository, plus a KServe InferenceService for it.

    REPO/<name>/config.pbtxt      platform, max_batch_size, inputs/outputs without the batch dimension,
                                  dynamic_batching, instance_group, label_filename (classification extension)
    REPO/<name>/labels.txt        one class per line, in output order
    REPO/<name>/1/model.onnx      the bundle's artifact, byte for byte (model.pt for TorchScript)
    REPO/inferenceservice.yaml    KServe, Triton runtime, v2 protocol; storageUri is yours to set

Reads the bundle only (its manifest and the chosen artifact), like serving: no torch needed.
"""

from __future__ import annotations

import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from modelship.errors import ConfigError
from modelship.manifest import check_bundle, require_artifact, require_passed

# artifact kind -> (Triton platform, file name in the version folder, input name, output name); None: the manifest's
TRITON = {
    "onnx": ("onnxruntime_onnx", "model.onnx", None, None),
    "onnx-fp16": ("onnxruntime_onnx", "model.onnx", None, None),
    "onnx-int8": ("onnxruntime_onnx", "model.onnx", None, None),
    "torchscript": ("pytorch_libtorch", "model.pt", "INPUT__0", "OUTPUT__0"),  # the PyTorch backend's naming
}
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


@dataclass(frozen=True)
class TritonConfig:
    """Options of `modelship triton`."""

    bundle: Path
    out: Path
    backend: str = "onnx"
    max_batch_size: int | None = None  # default: the largest batch the bundle's parity checked
    instances: int = 1
    queue_delay_us: int = 2000

    def __post_init__(self) -> None:
        if self.backend not in TRITON:
            why = " (Triton has no standard backend for torch.export programs)" if self.backend == "pt2" else ""
            raise ConfigError(f"--backend must be one of {', '.join(TRITON)}{why}, got {self.backend!r}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.instances < 1:
            raise ConfigError(f"--instances must be at least 1, got {self.instances}")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ConfigError(f"--out {self.out} exists and is not an empty folder; pick a new one")


def model_config(manifest: dict, cfg: TritonConfig, max_batch: int) -> str:
    """config.pbtxt for the chosen artifact (protobuf text format of Triton's ModelConfig)."""
    platform, _, input_name, output_name = TRITON[cfg.backend]
    art = manifest["artifacts"][cfg.backend]
    dtype = TYPES[art.get("io", manifest["input"]["dtype"])]
    dims = ", ".join(str(d) for d in manifest["input"]["shape"][1:])
    return f"""name: "{manifest["name"]}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{input_name or manifest["input"]["name"]}"
    data_type: {dtype}
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{output_name or manifest["output"]["name"]}"
    data_type: {dtype}
    dims: [ {len(manifest["classes"])} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {cfg.queue_delay_us}
}}
instance_group [
  {{
    count: {cfg.instances}
    kind: KIND_AUTO
  }}
]
"""


def inference_service(name: str, backend: str) -> str:
    """A KServe InferenceService serving the repository with its Triton runtime over the v2 protocol."""
    dns = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    dns = dns if dns[:1].isalpha() else f"m-{dns}"[:63]
    return f"""# KServe InferenceService for the Triton model repository in this folder ({backend} artifact of {name}).
# Upload this folder to storage your cluster can read, set storageUri to it, then: kubectl apply -f this file.
#   storageUri: gs://BUCKET/PATH  |  s3://BUCKET/PATH  |  pvc://CLAIM/PATH
# Clients then call /v2/models/{name}/infer on the service, as they call `modelship serve`.
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {dns}
spec:
  predictor:
    model:
      modelFormat:
        name: triton
      protocolVersion: v2
      storageUri: "STORAGE_URI"  # set this: where you uploaded this folder
"""


def write_repository(cfg: TritonConfig) -> Path:
    """Write the Triton repository for `cfg.bundle`'s artifact into `cfg.out`; return the model's folder."""
    manifest = check_bundle(cfg.bundle)
    require_artifact(manifest, cfg.bundle, cfg.backend)
    require_passed(manifest, cfg.bundle)
    from modelship.backends import load_backend  # (the CLI imports this module to build its flags: no numpy then)

    load_backend(cfg.backend, cfg.bundle / manifest["artifacts"][cfg.backend]["path"], "cpu", 1)  # it opens
    checked = int(manifest["max_batch"])
    max_batch = cfg.max_batch_size or checked
    if max_batch > checked:
        raise ConfigError(
            f"--max-batch-size {max_batch} is over the largest batch the bundle was checked at ({checked}); "
            "re-export with a larger --max-batch"
        )
    tmp = cfg.out.parent / f".{cfg.out.name}.tmp-{secrets.token_hex(4)}"
    model_dir = tmp / manifest["name"]
    try:
        (model_dir / "1").mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"cannot write the repository to {cfg.out}: {e.strerror or e}") from None
    try:
        shutil.copyfile(
            cfg.bundle / manifest["artifacts"][cfg.backend]["path"], model_dir / "1" / TRITON[cfg.backend][1]
        )
        (model_dir / "config.pbtxt").write_text(model_config(manifest, cfg, max_batch))
        (model_dir / "labels.txt").write_text("".join(f"{c}\n" for c in manifest["classes"]))
        (tmp / "inferenceservice.yaml").write_text(inference_service(manifest["name"], cfg.backend))
        if cfg.out.exists():
            cfg.out.rmdir()  # empty, checked above
        tmp.rename(cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg.out / manifest["name"]
