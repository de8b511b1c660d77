"""`--publish REPO`: a bundle whose gates passed becomes REPO/<name>/<next version>/ in one rename, nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelship.errors import BundleError
from modelship.manifest import check_bundle, read_manifest
from modelship.repository import publish, versions


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_publishes_each_passing_bundle_as_the_next_version(tmp_path: Path, tiny_ckpt: Path, cli) -> None:
    repo = tmp_path / "repo"
    for n in (1, 2):
        r = cli("export", tiny_ckpt, "--out", tmp_path / f"b{n}", "--name", "shapes", "--formats", "onnx",
                "--publish", repo)  # fmt: skip
        assert r.code == 0, r.err
        assert r.last_line.endswith(f"published shapes version {n}: {repo / 'shapes' / str(n)}")
    assert entries(repo) == ["shapes"] and entries(repo / "shapes") == ["1", "2"]  # no staging folder left
    for n in (1, 2):
        version = repo / "shapes" / str(n)
        assert check_bundle(version)["name"] == "shapes"  # whole, every hash right
        assert entries(version) == entries(tmp_path / f"b{n}")  # and the bundle written by --out stays
    assert versions(repo / "shapes") == [1, 2]


def test_a_bundle_that_fails_its_gate_is_not_published(tmp_path: Path, tiny_ckpt: Path, cli) -> None:
    repo = tmp_path / "repo"
    r = cli("export", tiny_ckpt, "--out", tmp_path / "b", "--formats", "onnx", "--atol", "0", "--rtol", "0",
            "--publish", repo)  # fmt: skip
    assert r.code == 1 and "must not ship" in r.last_line
    assert not repo.exists()


def test_bad_publish_targets_are_refused_before_any_work(tmp_path: Path, tiny_ckpt: Path, cli) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("export", tiny_ckpt, "--out", tmp_path / "b", "--publish", tmp_path / "file")
    assert r.code == 2
    assert r.last_line == (
        f"modelship export: error: --publish {tmp_path / 'file'} is a file; expected a folder for the model repository"
    )
    r = cli("export", tiny_ckpt, "--out", tmp_path / "b", "--publish", "/proc/modelship-repo")
    assert r.code == 2 and r.last_line == (
        "modelship export: error: --publish /proc/modelship-repo: cannot write in /proc (No such file or directory); "
        "pick a folder you can write to"
    )
    assert not (tmp_path / "b").exists()  # refused before the export ran


def test_versions_are_integers_and_a_taken_one_is_skipped(tmp_path: Path, tiny_bundle: Path) -> None:
    name = read_manifest(tiny_bundle)["name"]
    model = tmp_path / "repo" / name
    for folder in ("3", "latest", ".staging-0123", "0", "007x"):
        (model / folder).mkdir(parents=True)
    (model / "3" / "manifest.json").write_text("{}")  # someone else's version 3
    (model / "10").write_text("a file, not a version")
    assert versions(model) == [3]
    target = publish(tiny_bundle, tmp_path / "repo")
    assert target == model / "4" and check_bundle(target)
    assert entries(model) == sorted(["0", "007x", "10", "3", "4", ".staging-0123", "latest"])  # nothing else touched


def test_a_bundle_that_does_not_match_its_manifest_leaves_nothing_behind(tmp_path: Path, tiny_bundle: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with (bundle / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(BundleError, match="does not match its manifest"):
        publish(bundle, tmp_path / "repo")
    name = read_manifest(bundle)["name"]
    assert entries(tmp_path / "repo" / name) == []  # the staging copy is gone, no version appeared
