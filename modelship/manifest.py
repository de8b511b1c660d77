"""The bundle's `manifest.json`: the one contract between export and serving.

Export writes it (modelship.export.bundle builds the dict); `read_manifest` validates it for `modelship verify`,
`evaluate` and the server. Only the standard library here: serving imports this without torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from modelship.errors import BundleError, ConfigError
from modelship.files import sha256_file

FORMAT = "modelship.bundle"
VERSION = 2  # 2: `gates` (every gate with its verdict), `passed` (their conjunction), `reference` (when measured)
READABLE = (1, 2)  # a version-1 bundle's only gates are its parity block's
MANIFEST = "manifest.json"
PARITY = "parity.json"
REQUIRED = ("name", "classes", "model", "input", "output", "preprocess", "artifacts", "parity", "source", "versions")
# every artifact kind a bundle can hold, and its file: the exact formats (checked by atol/rtol against eager) and the
# deployment variants made from the ONNX file (checked by top-1 agreement and accuracy on labelled images)
FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "pt2": "model.pt2"}
VARIANTS = {"fp16": "onnx-fp16", "int8": "onnx-int8"}
ARTIFACT_FILES = {**FORMATS, "onnx-fp16": "model.fp16.onnx", "onnx-int8": "model.int8.onnx"}
BACKENDS = ("onnx", "onnx-fp16", "onnx-int8", "torchscript", "pt2")  # every artifact kind, as a --backend runs it
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def safe_name(text: str) -> str:
    """A name usable in URLs and the v2 API: runs of other characters become '-', at most 64 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:64].rstrip("-_.") or "model"


def read_manifest(bundle: Path) -> dict[str, Any]:
    """Load and validate BUNDLE/manifest.json: format, version, required keys and artifact files."""
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"bundle {bundle} is not a directory; expected the folder `modelship export --out` wrote")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}; is it a modelship bundle?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a modelship bundle manifest (format is not {FORMAT!r})")
    if manifest.get("version") not in READABLE:
        raise BundleError(
            f"{path} is bundle version {manifest.get('version')!r}; this modelship reads versions "
            f"{', '.join(map(str, READABLE))}. Re-export the checkpoint with this modelship"
        )
    required = REQUIRED + (("gates", "passed") if manifest["version"] >= 2 else ())
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks keys {missing}")
    if not manifest["artifacts"]:
        raise BundleError(f"{path} lists no artifacts")
    for kind, art in manifest["artifacts"].items():
        if kind not in ARTIFACT_FILES:
            raise BundleError(f"{path} lists an unknown artifact kind {kind!r}; expected {', '.join(ARTIFACT_FILES)}")
        file = bundle / art["path"]
        if Path(art["path"]).is_absolute() or ".." in Path(art["path"]).parts:
            raise BundleError(f"{path}: artifact path {art['path']!r} must be relative to the bundle")
        if not file.is_file():
            raise BundleError(f"{bundle}: the {kind} artifact {art['path']} is missing")
    ref = manifest.get("reference")
    if ref and not (bundle / str(ref.get("path", ""))).is_file():
        raise BundleError(f"{bundle}: its reference {ref.get('path')} is missing")
    return manifest


def hash_mismatches(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """One line per artifact whose sha256 differs from the manifest's; [] when all match."""
    bad = []
    listed = dict(manifest["artifacts"])
    if manifest.get("reference"):
        listed["reference"] = manifest["reference"]  # the reference too: drift is measured against it
    for kind, art in listed.items():
        actual = sha256_file(bundle / art["path"])
        if actual != art["sha256"]:
            bad.append(
                f"{kind} artifact {art['path']}: sha256 {actual[:12]}… but the manifest says {art['sha256'][:12]}…"
            )
    return bad


def check_bundle(bundle: Path) -> dict[str, Any]:
    """read_manifest + every sha256; raise BundleError naming each tampered artifact."""
    manifest = read_manifest(bundle)
    bad = hash_mismatches(bundle, manifest)
    if bad:
        raise BundleError(f"bundle {bundle} does not match its manifest: " + "; ".join(bad))
    return manifest


def gate_failures(manifest: dict[str, Any]) -> list[str]:
    """One line per gate the bundle failed (parity, a variant's, the accuracy floor), naming it and its figures;
    [] when it may ship. `passed` is the conjunction of `gates`; a bundle that says it passed while a gate failed is
    taken at its gates."""
    if "gates" not in manifest:  # version 1: parity (with the variants' gates) was the only one recorded
        parity = manifest["parity"]
        return [] if parity.get("passed") else [f"parity: {line}" for line in parity.get("failed") or ["failed"]]
    failed = [f"{g['gate']}: {g['detail']}" for g in manifest["gates"] if not g.get("passed")]
    if not failed and (manifest.get("passed") is not True or not manifest["parity"].get("passed")):
        failed.append("the manifest says it did not pass")
    return failed


def require_passed(manifest: dict[str, Any], bundle: Path) -> None:
    """BundleError unless every gate the bundle was put through passed: a bundle that failed one never ships."""
    failed = gate_failures(manifest)
    if failed:
        raise BundleError(
            f"bundle {bundle} failed its gates and must not ship: {'; '.join(failed[:3])}"
            + (f" (and {len(failed) - 3} more)" if len(failed) > 3 else "")
        )


def require_artifact(manifest: dict[str, Any], bundle: Path, kind: str) -> dict[str, Any]:
    """The manifest's entry for artifact `kind` (a --backend), or ConfigError naming what the bundle has."""
    if kind not in manifest["artifacts"]:
        have = ", ".join(manifest["artifacts"])
        raise ConfigError(f"--backend {kind}: bundle {bundle} has no {kind} artifact (it has {have})")
    return manifest["artifacts"][kind]
