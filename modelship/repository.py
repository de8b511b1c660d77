"""A model repository: `REPO/<name>/<version>/` with a bundle in each version folder, the layout Triton uses.

`publish` is how a bundle gets there (`modelship export --publish REPO`, `modelship run --publish REPO`): it is
copied, with every artifact's sha256 checked, into a hidden staging folder beside the versions and renamed to the
next version in one step, so a server that polls REPO sees a version whole or not at all. Two publishers racing for
the same number each get one of their own (a rename onto a version that exists fails, and the next is tried).
Entries whose names start with "." are never versions. Standard library only.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from modelship.errors import ConfigError, ModelshipError
from modelship.manifest import NAME_RE, check_bundle, read_manifest, require_passed

STAGING = ".staging-"  # a publish in progress, hidden from anything that reads versions


class PublishError(ModelshipError):
    """The bundle could not be copied into the repository (disk full, a file vanished). Exit code 1."""

    exit_code = 1


def versions(model_dir: Path) -> list[int]:
    """The version numbers under a model's folder: its folders named by a positive integer, ascending."""
    if not model_dir.is_dir():
        return []
    found = [p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(int(name) for name in found if int(name) > 0)


def check_target(repo: Path) -> None:
    """ConfigError unless `repo` is a folder that can be written, or can be made: checked before any work starts
    (by making and removing a folder where the first one would go), leaving nothing behind."""
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"--publish {repo} is a file; expected a folder for the model repository")
    existing = next(p for p in (repo, *repo.absolute().parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=STAGING, dir=existing))
    except OSError as e:
        raise ConfigError(
            f"--publish {repo}: cannot write in {existing} ({e.strerror}); pick a folder you can write to"
        ) from None


def publish(bundle: Path, repo: Path) -> Path:
    """Copy `bundle` (its gates passed) to REPO/<its name>/<next version>/ in one rename; that folder."""
    manifest = read_manifest(bundle)
    require_passed(manifest, bundle)  # the callers publish only what passed; a bundle that failed never gets here
    name = manifest["name"]
    if not NAME_RE.match(name):
        raise ConfigError(f"bundle {bundle} is named {name!r}, which is not a model name for a repository")
    model_dir = repo / name
    staging = model_dir / f"{STAGING}{secrets.token_hex(6)}"
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(bundle, staging)
        check_bundle(staging)  # the copy is the bundle: every artifact's hash again
        _sync(staging)
        target = _rename_into(staging, model_dir)
        _fsync_dir(model_dir)
    except BaseException as e:  # a failed or interrupted publish leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            why = e.strerror or str(e)
            raise PublishError(f"could not publish {bundle} to {model_dir} ({why}); nothing was published") from None
        raise
    return target


def _rename_into(staging: Path, model_dir: Path) -> Path:
    """Rename `staging` to the next free version of `model_dir` (a version another publisher took first is skipped);
    a rename is atomic, and onto a folder that holds anything it fails rather than replacing it."""
    version = max(versions(model_dir), default=0) + 1
    while True:
        target = model_dir / str(version)
        if not target.exists():
            try:
                os.rename(staging, target)
                return target
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        version += 1


def _sync(folder: Path) -> None:
    """Every file of `folder` on disk before the rename makes it visible (a crash then leaves no torn version)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_bundle(path: Path) -> bool:
    """`path` is one bundle (its manifest.json at the top), not a repository of them."""
    return (path / "manifest.json").is_file()


def scan(repo: Path) -> tuple[dict[str, dict[int, Path]], dict[str, str]]:
    """({model name: {version: folder}}, {model name: why its folder is not usable}) of a repository.

    A model folder is usable when its name is a model name and it holds version folders only (positive integers;
    names starting with "." are ignored: a publish in progress, an editor's leftovers)."""
    if not repo.is_dir():
        raise ConfigError(f"{repo} is not a folder; expected a bundle or a model repository REPO/<name>/<version>/")
    if (repo / "checkpoints").is_dir() and ((repo / "bundle").is_dir() or (repo / "bundle.failed").is_dir()):
        shipped = repo / "bundle"
        raise ConfigError(
            f"{repo} is a run's folder, not a bundle or a model repository; pass its bundle, {shipped}"
            if shipped.is_dir()
            else f"{repo} is a run's folder whose bundle failed its gates ({repo / 'bundle.failed'}): nothing to serve"
        )
    models: dict[str, dict[int, Path]] = {}
    problems: dict[str, str] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = folder.name
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        bad = [p.name for p in entries if not (p.is_dir() and p.name.isdigit() and int(p.name) > 0)]
        if not NAME_RE.match(name):
            problems[name] = (
                f"{folder}: {name!r} is not a model name (letters, digits, '.', '_' or '-', at most 64, "
                "starting with a letter or digit)"
            )
        elif bad:
            problems[name] = (
                f"{folder}: {', '.join(repr(b) for b in bad)} is not a version folder; a model folder holds only "
                f"versions named by positive integers ({folder}/1/manifest.json ...)"
            )
        elif not entries:
            problems[name] = f"{folder} holds no version; expected {folder}/1/manifest.json ..."
        else:
            models[name] = {int(p.name): p for p in entries}
    if not models and not problems:
        raise ConfigError(
            f"{repo} holds no model; expected a bundle (its manifest.json) or a repository REPO/<name>/<version>/"
        )
    return models, problems
