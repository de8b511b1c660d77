"""The layers and their import rule, read from the source (ast), and the size limits that keep modules readable.

CLI -> pipeline -> tools -> stages -> base. Among the stages, export may import training; serving imports neither (it
reads a bundle's manifest and artifacts only) and never torch. The tools (`predict`, `evaluate`, `monitor`, `scale`)
need a runtime, not a stage. Inside serving: the protocols (http_api, grpc_service) go through the data plane, never to
dispatch; dispatch never imports a protocol; control imports neither; only compat imports litserve.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "modelship"
STAGES = ("training", "export", "serving")
TOOLS = ("predict", "evaluate", "monitor", "scale")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
FLAG_TABLES = {"add_train_args", "add_export_options", "add_serve_args"}  # flat argparse tables, long by nature


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (the stages through their links)."""
    found = {}
    files = [Path(d, f) for d, _, names in os.walk(PACKAGE, followlinks=True) for f in names if f.endswith(".py")]
    for path in sorted(files):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # modelship/__init__.py
    if parts[1] in STAGES:
        return parts[1]
    if parts[1] in ("cli", "pipeline"):
        return parts[1]
    if parts[1] in TOOLS:
        return "tools"
    return "base"


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, top-level or inside functions, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{a.name}" if base.startswith("modelship") else base) for a in node.names]
    return found


FORBIDDEN = {
    "base": {"training", "export", "serving", "tools", "pipeline", "cli"},
    "training": {"export", "serving", "tools", "pipeline", "cli"},
    "export": {"serving", "tools", "pipeline", "cli"},
    "serving": {"training", "export", "tools", "pipeline", "cli"},
    "tools": {"training", "export", "serving", "pipeline", "cli"},
    "pipeline": {"cli"},
    "cli": set(),
}
# inside serving, by job: (importer, imported) parts of modelship.serving that may not meet
PROTOCOLS = ("http_api", "grpc_service")
SERVING_FORBIDDEN = {
    **{p: {"dispatch"} for p in PROTOCOLS},  # the protocols reach the models through the data plane only
    "dispatch": {*PROTOCOLS, "dataplane"},
    "control": {*PROTOCOLS, "dataplane", "dispatch"},
}


def serving_part(module: str) -> str | None:
    """The part of serving a module is in (http_api, dispatch, control, dataplane, ...), or None outside serving."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["modelship", "serving"] else None


def serving_violations(mods: dict[str, Path]) -> list[str]:
    """Every import inside serving that breaks its direction, and every import of litserve outside compat."""
    found = []
    for module, where, name in every_import(mods):
        mine, theirs = serving_part(module), serving_part(name)
        if name.split(".")[0] == "litserve" and mine != "compat":
            found.append(f"{where} {module} imports {name}: only modelship.serving.compat imports litserve")
        if mine is not None and theirs in SERVING_FORBIDDEN.get(mine, ()):
            found.append(f"{where} {module} imports {name}: {mine} may not import {theirs}")
    return found


def every_import(mods: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(module, `file:line`, imported name) for every import of every module."""
    found = []
    for module, path in mods.items():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        found += [(module, f"{shown}:{line}", name) for line, name in imports(module, path)]
    return found


def violations(mods: dict[str, Path]) -> list[str]:
    """Every import that breaks the layer rule, as `file:line (layer) imports name: why`."""
    found = []
    for module, at, name in every_import(mods):
        mine = layer(module)
        where = f"{at} ({mine}) imports {name}"
        top = name.split(".")[0]
        if top in STAGES:
            found.append(f"{where}: the stages are modelship.{top}, never a top-level {top}")
        if top != "modelship" or name == "modelship":
            continue
        target = layer(".".join(name.split(".")[:2]))
        if target in FORBIDDEN[mine]:
            found.append(f"{where}: {mine} may not import {target}")
    return found


def test_every_module_is_under_the_one_namespace() -> None:
    names = set(modules())
    assert {"modelship.training.train", "modelship.export.bundle", "modelship.serving.server"} <= names
    assert {"modelship.pipeline", "modelship.cli", "modelship.errors", "modelship.manifest"} <= names
    for stage in STAGES:
        link = PACKAGE / stage
        assert link.is_symlink() and link.resolve() == (REPO / stage).resolve(), f"modelship/{stage} -> ../{stage}"


def test_imports_flow_down_the_layers_only() -> None:
    assert violations(modules()) == []


def test_serving_is_split_by_job_and_only_compat_imports_litserve() -> None:
    assert serving_violations(modules()) == []
    parts = {serving_part(m) for m in modules()} - {None}
    assert {"http_api", "dispatch", "control", "compat", "dataplane", "grpc_service", "v2", "errors"} <= parts


def test_the_clients_and_tools_are_in_the_base_and_tools_layers() -> None:
    assert {"modelship.predict", "modelship.evaluate", "modelship.client", "modelship.grpc_client"} <= set(modules())


def test_the_serving_rule_catches_planted_violations(tmp_path: Path) -> None:
    planted = {
        "modelship.serving.http_api.spec": "from modelship.serving.dispatch import transport\n",
        "modelship.serving.dispatch.worker": "import litserve as ls\nfrom modelship.serving.http_api import spec\n",
        "modelship.serving.control.catalog": "from modelship.serving import dataplane\n",
        "modelship.predict": "from modelship.serving.dispatch import transport\n",
    }
    paths = {}
    for module, code in planted.items():
        paths[module] = tmp_path / f"{module}.py"
        paths[module].write_text(code)
    found = serving_violations(paths) + violations(paths)
    assert any("http_api may not import dispatch" in v for v in found)
    assert any("only modelship.serving.compat imports litserve" in v for v in found)
    assert any("dispatch may not import http_api" in v for v in found)
    assert any("control may not import dataplane" in v for v in found)
    assert any("(tools) imports modelship.serving.dispatch.transport: tools may not import serving" in v for v in found)


def test_the_rule_catches_a_planted_violation(tmp_path: Path) -> None:
    """The checker itself: a base module importing a stage and serving importing training are both reported."""
    planted = {
        "modelship.files": "from modelship.training.checkpoint import load_checkpoint\n",
        "modelship.serving.grpc_service": "import modelship.training.models\nimport export.bundle\n",
    }
    paths = {}
    for module, code in planted.items():
        paths[module] = tmp_path / (module.replace(".", "_") + ".py")
        paths[module].write_text(code)
    found = violations(paths)
    assert any(
        "(base) imports modelship.training.checkpoint" in v and "base may not import training" in v for v in found
    )
    assert any("serving may not import training" in v for v in found)
    assert any("never a top-level export" in v for v in found)


def test_serving_imports_torch_only_through_the_torch_backends() -> None:
    """`modelship[serve]` runs without torch: serving never imports it, and the runtime backends it loads
    (modelship.backends, base) import it inside the torch backends only."""
    for module, path in modules().items():
        if layer(module) != "serving" and module != "modelship.backends":
            continue
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("torch", "torchvision", "onnx")], module
        inner = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names)]
        assert not inner or module == "modelship.backends", f"{module} imports torch"


def test_no_file_over_400_lines_no_function_over_60() -> None:
    long = []
    for module, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            long.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in FLAG_TABLES:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert long == []
