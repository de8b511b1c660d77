"""The model controller's rules on its own state: what the workers report (the broker's snapshot) decides each
version's state; a version leaves the table only once drained."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelship.serving.control.catalog import Catalog
from modelship.serving.control.controller import DRAIN_MIN, Controller
from modelship.serving.control.table import Reader


def controller(tmp_path: Path, bundle: Path) -> tuple[Controller, SimpleNamespace]:
    shutil.copytree(bundle, tmp_path / "repo" / "m" / "1")
    c = Controller(tmp_path / "repo", str(tmp_path), "onnx")
    c.start_table()
    broker = SimpleNamespace(snapshot=({}, {}))  # what the broker's heartbeat publishes: worker reports, outstanding
    c.broker = broker
    return c, broker


def report(generation: int, failed: dict | None = None) -> dict:
    return {"generation": generation, "failed": failed or {}, "rss": {}}


def states(c: Controller) -> dict[str, str]:
    return {k: v.state for k, v in c.table.versions.items()}


def test_a_version_is_ready_once_every_worker_has_it_and_the_one_it_replaces_drains(
    tmp_path: Path, affine_bundle: Path
) -> None:
    c, broker = controller(tmp_path, affine_bundle)
    broker.snapshot = ({b"w1": report(1), b"w2": None}, {})  # w2 has not reported yet
    c.step(0.0)
    assert states(c) == {"m/1": "LOADING"} and not c.table.started
    broker.snapshot = ({b"w1": report(1), b"w2": report(1)}, {})
    c.step(0.0)
    assert states(c) == {"m/1": "READY"} and c.table.started
    c.add("m", 2, tmp_path / "repo" / "m" / "1")
    c.write()
    added = c.table.versions["m/2"].added
    broker.snapshot = ({b"w1": report(added), b"w2": report(added - 1)}, {})
    c.step(1.0)
    assert states(c) == {"m/1": "READY", "m/2": "LOADING"}
    broker.snapshot = ({b"w1": report(added), b"w2": report(added)}, {b"m/1": 3})  # version 1 still holds 3 requests
    c.step(2.0)
    assert states(c) == {"m/1": "UNLOADING", "m/2": "READY"}
    assert Reader(str(tmp_path)).current().versions["m/1"].state == "UNLOADING"  # written for every process
    since = c.since["m/1"]
    c.step(since + DRAIN_MIN + 1)
    assert "m/1" in c.table.versions  # not drained yet
    broker.snapshot = ({b"w1": report(added), b"w2": report(added)}, {})
    c.step(since + DRAIN_MIN + 1)
    assert states(c) == {"m/2": "READY"}


def test_a_version_a_worker_failed_is_unavailable_and_no_older_version_outlives_the_newest_ready(
    tmp_path: Path, affine_bundle: Path
) -> None:
    c, broker = controller(tmp_path, affine_bundle)
    broker.snapshot = ({b"w1": report(1)}, {})
    c.step(0.0)
    for v in (2, 3):
        c.add("m", v, tmp_path / "repo" / "m" / "1")
    c.write()
    broker.snapshot = ({b"w1": report(c.table.generation, {"m/3": "failed to load on a worker: boom"})}, {})
    c.step(1.0)
    # 3 failed; 2 is loaded everywhere and is now the newest READY, so 1 goes; 2 serves
    assert states(c) == {"m/1": "UNLOADING", "m/2": "READY", "m/3": "UNAVAILABLE"}
    assert c.table.versions["m/3"].reason == "failed to load on a worker: boom"


def test_an_api_server_whose_view_is_stale_reads_the_table_again_before_it_refuses(
    tmp_path: Path, affine_bundle: Path
) -> None:
    c, broker = controller(tmp_path, affine_bundle)
    catalog = Catalog(str(tmp_path), "onnx")
    assert catalog.table.versions["m/1"].state == "LOADING"  # this API server's view: not routable yet
    catalog.reader.checked = time.monotonic() + 3600  # and no timed look again: the stale view stays, by force
    broker.snapshot = ({b"w1": report(1)}, {})
    c.step(0.0)  # another API server can now route it
    assert catalog.table.versions["m/1"].state == "LOADING"
    assert catalog.resolve("m").version == "1"  # refused by the stale view, so read again: routed
    assert catalog.table.versions["m/1"].state == "READY"


def test_predict_on_an_api_server_whose_view_is_stale_reads_the_table_again(
    tmp_path: Path, affine_bundle: Path
) -> None:
    """/health 200 from one API server, then /predict on another that has not looked at the table since: it read
    "no model is ready yet" (503) from its stale view (CI, once in four runs)."""
    c, broker = controller(tmp_path, affine_bundle)
    catalog = Catalog(str(tmp_path), "onnx")
    catalog.reader.checked = time.monotonic() + 3600  # no timed look: the stale view stays, by force
    broker.snapshot = ({b"w1": report(1)}, {})
    c.step(0.0)  # READY: the other API server's /health turned 200
    assert catalog.names() == []
    assert catalog.only().version == "1"


def rollback(tmp_path: Path, bundle: Path) -> tuple[Controller, SimpleNamespace, Path]:
    """A polled repository serving version 2 of m (version 1 unloaded, as --version-policy latest leaves it), then
    version 2's folder removed and the repository scanned: the controller's state right after the scan."""
    repo = tmp_path / "repo"
    for v in ("1", "2"):
        shutil.copytree(bundle, repo / "m" / v)
    c = Controller(repo, str(tmp_path), "onnx", mode="poll", poll_interval=3600)
    c.start_table()
    broker = SimpleNamespace(snapshot=({b"w1": report(c.table.generation)}, {}))
    c.broker = broker
    c.step(0.0)
    assert states(c) == {"m/2": "READY"}
    shutil.rmtree(repo / "m" / "2")  # the rollback: the newest version's folder goes
    c.next_scan = 0.0
    c.step(1.0)
    return c, broker, repo


def test_a_rollback_keeps_routing_to_the_version_that_left_until_the_one_taking_over_is_ready(
    tmp_path: Path, affine_bundle: Path
) -> None:
    c, broker, _ = rollback(tmp_path, affine_bundle)
    # the workers have not loaded version 1 yet (their reports are held back): 2 answers from memory meanwhile
    assert states(c) == {"m/1": "LOADING", "m/2": "READY"}
    api_server = Catalog(str(tmp_path), "onnx")
    assert api_server.resolve("m").version == "2"
    for now in (2.0, 3.0, 60.0):  # however long the load takes
        c.step(now)
        assert states(c) == {"m/1": "LOADING", "m/2": "READY"}
    broker.snapshot = ({b"w1": report(c.table.versions["m/1"].added)}, {})  # loaded on every worker
    c.step(61.0)
    assert states(c) == {"m/1": "READY", "m/2": "UNLOADING"}  # one table write: the swap, as a forward one
    api_server.reader.checked = 0.0
    assert api_server.resolve("m").version == "1"


def test_a_rollback_whose_successor_fails_unloads_the_version_that_left(tmp_path: Path, affine_bundle: Path) -> None:
    c, broker, _ = rollback(tmp_path, affine_bundle)
    broker.snapshot = ({b"w1": report(c.table.generation, {"m/1": "failed to load on a worker: boom"})}, {})
    c.step(2.0)
    assert states(c) == {"m/1": "UNAVAILABLE", "m/2": "UNLOADING"}  # nothing can take over: the repository wins


def test_a_broken_model_folder_is_logged_once_per_change_not_every_poll(
    tmp_path: Path, affine_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(affine_bundle, repo / "m" / "1")
    c = Controller(repo, str(tmp_path), "onnx", mode="poll", poll_interval=3600)
    c.start_table()
    c.broker = SimpleNamespace(snapshot=({b"w1": report(c.table.generation)}, {}))
    (repo / "broken").mkdir()
    (repo / "broken" / "latest").mkdir()  # not a version folder
    caplog.set_level(logging.INFO, logger="modelship.serving.control.controller")

    def polls(n: int) -> list[str]:
        for _ in range(n):
            c.next_scan = 0.0
            c.step(time.monotonic())
        found = [r.getMessage() for r in caplog.records if "model repository" in r.getMessage()]
        caplog.clear()
        return found

    broken = repo / "broken"
    assert polls(5) == [
        f"model repository: {broken}: 'latest' is not a version folder; a model folder holds only versions named by "
        f"positive integers ({broken}/1/manifest.json ...); what serves keeps serving"
    ]
    assert c.table.problems.keys() == {"broken"}  # the index lists it all along
    (repo / "broken" / "latest").rename(repo / "broken" / "1")
    shutil.copytree(affine_bundle, repo / "broken" / "2")
    shutil.rmtree(repo / "broken" / "1")
    assert polls(5) == ["model repository: model folder broken is usable again"]
