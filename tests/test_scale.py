"""`modelship predict --engine ray` on real Ray clusters on loopback: a `ray start --head` cluster of 2 CPUs, a
two-node cluster (ray.cluster_utils.Cluster) and a local one started for the run. Rows against local predict's,
listings and URIs, bad files, the clear errors, and every socket of every cluster process on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # this process's Ray (the two-node cluster) stays on loopback

from tests.helpers import free_port, run_modelship, write_folder

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("ray.data")
RAY_HOME = tempfile.mkdtemp(prefix="rayhome")  # Ray keeps its token in ~/.ray: the tests' clusters keep theirs here
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HOME": RAY_HOME}


# ----------------------------------------------------------------------------------- the processes and their sockets


def parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def cluster_processes(marker: str) -> set[int]:
    """Every process whose command line names `marker` (the cluster's temp folder), and their descendants."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.add(int(d.name))
    ppid = parents()
    grew = True
    while grew:
        more = {pid for pid, parent in ppid.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]) + f":{int(port, 16)}"
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # the kernel prints four host-order 32-bit words
    b = b"".join(words)
    if b[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(str(x) for x in b[12:]) + f":{int(port, 16)}"
    return ("::1" if b == b"\0" * 15 + b"\1" else b.hex()) + f":{int(port, 16)}"


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0]
    return host.startswith("127.") or host.startswith("::ffff:127.") or host == "::1"


def off_loopback(pids: set[int]) -> list[str]:
    """Each TCP or UDP socket of these processes that listens or talks anywhere but 127.0.0.1 / ::1."""
    table = {}
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
                f = line.split()
                table[f[9]] = (kind, address(f[1]), address(f[2]), f[3])
    bad = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in (Path(f"/proc/{pid}/fd")).iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        entry = table.get(target[8:-1])
                        if entry is None:
                            continue  # a unix socket
                        kind, local, remote, state = entry
                        listening = state == "0A" or kind.startswith("udp")
                        if not is_loopback(local) or (not listening and not is_loopback(remote)):
                            bad.append(f"pid {pid}: {kind} {local} -> {remote} (state {state})")
    return bad


def stop(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def ray_home() -> Iterator[None]:
    yield
    shutil.rmtree(RAY_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, str]]:
    """A `ray start --head` cluster of 2 CPUs on 127.0.0.1: (its address, its temp folder); stopped by pid."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    token = Path(RAY_HOME) / ".ray" / "auth_token"  # `ray start` then serves with token authentication, as it does
    token.parent.mkdir(exist_ok=True)  # on a machine where `ray.init()` ran once: the client must follow
    token.write_text(os.urandom(32).hex())
    port = free_port()
    ray = Path(sys.executable).parent / "ray"
    subprocess.run(
        [str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
         "--temp-dir", temp, "--include-dashboard", "false", "--disable-usage-stats"],
        check=True, capture_output=True, timeout=120, env={**os.environ, **LOOPBACK_ENV},
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}", temp
    finally:
        stop(cluster_processes(temp))
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "photos", {"a": 6, "b": 6}, size=(40, 30))
    write_folder(root / "photos", {"gray": 3}, mode="L", size=(20, 50), seed=1)
    (root / "photos" / ".thumbs").mkdir()
    (root / "photos" / ".thumbs" / "x.png").write_bytes(b"not read: hidden")
    return root / "photos"


def local_rows(bundle: Path, *paths: str) -> dict[str, dict]:
    r = run_modelship("predict", "--bundle", str(bundle), *paths, "--format", "jsonl")
    assert r.code == 0, r.err
    return {row["path"]: row for row in map(json.loads, r.out.splitlines())}


def ray_predict(*args: str, timeout: float = 180) -> tuple[int, str]:
    r = run_modelship("predict", "--engine", "ray", *args, timeout=timeout, env=LOOPBACK_ENV)
    return r.code, r.err


# ------------------------------------------------------------------------------------------------------------ tests


def test_rows_equal_local_predict_on_a_2_cpu_cluster_all_on_loopback(head, images: Path, tiny_bundle: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    address, temp = head
    out = tmp_path / "out"
    code, err = ray_predict("--address", address, "--bundle", str(tiny_bundle), str(images), "--output", str(out),
                            "--logits", "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("modelship predict: 15 images in ") and f"15 scored, 0 bad files: {out}" in last, last
    rows = pq.read_table(out).to_pylist()  # the folder reads as one Parquet dataset: _errors.csv is skipped
    assert (out / "_errors.csv").read_text() == "path,error\n"
    local = local_rows(tiny_bundle, str(images))
    assert sorted(r["path"] for r in rows) == sorted(local)  # each file once: none lost, none twice, hidden skipped
    for row in rows:
        assert len(row.pop("logits")) == 5 and row == local[row["path"]]  # bit for bit: labels, indices, scores
    assert not off_loopback(cluster_processes(temp))  # the head, its agents and the actors' workers
    assert len(cluster_processes(temp)) > 3
    code, err = ray_predict("--address", address, "--bundle", str(tiny_bundle), str(images / "a"), "--output",
                            str(out), "--force", "--format", "jsonl")  # fmt: skip
    assert code == 0 and len((out / "predictions.jsonl").read_text().splitlines()) == 6, err
    assert not list(out.glob("*.parquet"))  # replaced whole


def test_listings_uris_and_bad_files(head, images: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    address, _ = head
    bad = tmp_path / "bad"
    bad.mkdir()
    good = sorted(images.rglob("a/*.png"))
    (bad / "truncated.png").write_bytes(good[0].read_bytes()[:60])
    (bad / "notes.png").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a listing\n{good[1]}\n\nbad/truncated.png\nbad/missing.png\nfile://{good[2]}\n")
    out = tmp_path / "out"
    code, err = ray_predict("--address", address, "--bundle", str(tiny_bundle), str(listing), f"file://{images}/b",
                            str(bad / "notes.png"), "--output", str(out), "--format", "csv")  # fmt: skip
    assert code == 1, err
    assert "11 images in" in err.splitlines()[-1] and "8 scored, 3 bad file(s), listed in" in err.splitlines()[-1]
    errors = dict(line.split(",", 1) for line in (out / "_errors.csv").read_text().splitlines()[1:])
    assert set(errors) == {"bad/truncated.png", "bad/missing.png", str(bad / "notes.png")}
    assert "truncated" in errors["bad/truncated.png"] and "No such file" in errors["bad/missing.png"]
    assert "not an image" in errors[str(bad / "notes.png")]
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,label,index,score,top_k" and len(lines) == 9
    by_path = {line.split(",", 1)[0]: line for line in lines[1:]}
    local = run_modelship("predict", "--bundle", str(tiny_bundle), str(good[1]), "--format", "csv").out.splitlines()
    assert by_path[str(good[1])] == local[1]  # a listed file: local predict's CSV line
    assert f"file://{good[2]}" in by_path and f"file://{images}/b/" in " ".join(by_path)


def test_two_nodes_both_run_actors(images: Path, tiny_bundle: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("HOME", RAY_HOME)  # this process starts the cluster: its token goes there, not to ~/.ray
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # and stays off (ray.init would set it in os.environ)

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp})  # fmt: skip
    try:
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        code, err = ray_predict("--address", cluster.address, "--bundle", str(tiny_bundle), str(images), "--output",
                                str(out), "--batch-size", "2")  # fmt: skip
        assert code == 0 and "on 2 actor(s)" in err.splitlines()[-1], err
        assert len(pq.read_table(out)) == 15
        actors = ray._private.state.state.actor_table(None)
        nodes = {a["Address"]["NodeID"] for a in actors.values() if "Scorer" in a["ActorClassName"]}
        assert len(nodes) == 2, actors  # the pool spread over both nodes
        assert not off_loopback(cluster_processes(temp))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_cluster_for_the_run_finishes_on_two_cpus(images: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = ray_predict("--bundle", str(tiny_bundle), str(images), "--output", str(out), "--format", "jsonl")
    assert code == 0, err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 15


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--bundle", "nope", "IMAGES"), "nope"),
        (("--bundle", "BUNDLE", "IMAGES/missing"), "source IMAGES/missing does not exist"),
        (("--bundle", "BUNDLE", "EMPTY"), "folder EMPTY has no images"),
        (("--bundle", "BUNDLE", "IMAGES", "--address", "127.0.0.1:1"), "cannot reach the Ray cluster at 127.0.0.1:1"),
        (("--bundle", "BUNDLE", "IMAGES", "--address", "nowhere"), "--address nowhere is not auto, HOST:PORT"),
        (("--bundle", "BUNDLE", "IMAGES", "--format", "tsv"), "--engine ray writes parquet, csv, jsonl"),
        (("--bundle", "BUNDLE", "IMAGES", "--actors", "0"), "--actors must be at least 1"),
        (("--bundle", "BUNDLE", "IMAGES", "--output", "EXISTING"), "exists; pass --force to replace it"),
        (("--url", "http://127.0.0.1:1", "IMAGES"), "--engine ray runs the bundle on the cluster"),
        (
            ("--bundle", "BUNDLE", "IMAGES", "--engine", "local", "--format", "parquet"),
            "(parquet goes with --engine ray)",
        ),
        (("--bundle", "BUNDLE", "s3-nope://x/y"), "cannot list s3-nope://x/y"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(cli, images: Path, tiny_bundle: Path, tmp_path: Path,
                                                 args: tuple[str, ...], message: str) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing").mkdir()
    swap = {"BUNDLE": str(tiny_bundle), "IMAGES": str(images), "EMPTY": str(tmp_path / "empty"),
            "EXISTING": str(tmp_path / "existing")}  # fmt: skip
    argv = [next((a.replace(k, v) for k, v in swap.items() if a.startswith(k)), a) for a in args]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    r = cli("predict", "--engine", "ray", *argv)
    message = next((message.replace(k, v) for k, v in swap.items() if k in message), message)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing"]  # nothing written


def test_more_actors_than_the_cluster_can_hold_is_refused(head, images: Path, tiny_bundle: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    code, err = ray_predict("--address", head[0], "--bundle", str(tiny_bundle), str(images), "--output",
                            str(tmp_path / "out"), "--actors", "2")  # fmt: skip
    assert code == 2 and "--actors 2: the cluster has 2 CPUs, room for 1 actor(s)" in err.strip().splitlines()[-1]
    assert "44687" in err and not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_actors_give_local_predicts_labels(images: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, err = ray_predict("--bundle", str(tiny_bundle), str(images), "--output", str(out), "--device", "cuda")
    assert code == 0, err
    local = local_rows(tiny_bundle, str(images))
    for row in pq.read_table(out).to_pylist():
        mine = local[row["path"]]
        assert (row["label"], row["index"]) == (mine["label"], mine["index"])
        assert abs(row["score"] - mine["score"]) < 1e-3  # CUDA's kernels round differently from the CPU's
