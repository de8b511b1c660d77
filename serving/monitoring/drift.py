"""Live drift, in the main process: every EVERY seconds, each READY model version's newest answers from every
process's window (serving/monitoring/window.py), their figures against the bundle's reference
(modelship.reference), and a status: `ok`, `warn` or `drift`; `collecting` while the window holds fewer than
MIN_ANSWERS, `no_reference` for a bundle without one. Written as Prometheus gauges (labelled by model and version)
and as one JSON document per version in the run folder, which the API servers answer
GET /v2/models/{name}[/versions/{v}]/drift from.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from modelship import reference
from modelship.files import read_json, replace_json
from modelship.manifest import read_manifest
from modelship.serving.control.table import READY, Reader
from modelship.serving.metrics import metrics
from modelship.serving.monitoring.window import FOLDER, merged

log = logging.getLogger(__name__)

EVERY = 1.0  # seconds between looks
MIN_ANSWERS = 50  # fewer answers than this say too little to judge
STATUS_VALUE = {"ok": 0, "warn": 1, "drift": 2, "collecting": -1, "no_reference": -2}  # the status gauge's value


def document_path(run_dir: str, key: str) -> Path:
    return Path(run_dir) / FOLDER / f"{key.replace('/', '@')}.json"


def read_document(run_dir: str, key: str) -> dict[str, Any] | None:
    """The last drift document of version `key`, or None before the first."""
    doc = read_json(document_path(run_dir, key))
    return None if doc is None else dict(doc)


class DriftMonitor:
    def __init__(self, run_dir: str, size: int, thresholds: reference.Thresholds) -> None:
        self.run_dir, self.size, self.thresholds = run_dir, size, thresholds
        self.reader = Reader(run_dir)
        self.references: dict[str, dict[str, Any] | None] = {}  # version key -> its bundle's reference

    def start(self) -> None:
        threading.Thread(target=self._run, name="modelship-drift", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(EVERY)
            try:
                self.step()
            except Exception:  # a bundle read that failed, a full disk: said, and tried again at the next look
                log.exception("the drift monitor failed a look; it carries on")

    def step(self) -> None:
        self.reader.reload()
        for key, v in self.reader.table.versions.items():
            if v.state == READY:
                self.publish(key, v.name, str(v.version), self.look(key, v.path))

    def look(self, key: str, path: str) -> dict[str, Any]:
        """The drift document of one version now."""
        if key not in self.references:
            bundle = Path(path)
            self.references[key] = reference.read(bundle, read_manifest(bundle))
        ref = self.references[key]
        window = {"size": self.size, "answers": 0}
        doc: dict[str, Any] = {"window": window, "thresholds": {k: list(v) for k, v in vars(self.thresholds).items()}}
        if ref is None:
            why = "its bundle has no reference.json (exported without its validation images): re-export to get one"
            return {**doc, "status": "no_reference", "reasons": [why], "figures": None}
        answers = merged(self.run_dir, key, self.size)
        window["answers"] = len(answers["pred"])
        fig = reference.figures(ref, answers["pred"], answers["conf"], answers["means"])
        if window["answers"] < MIN_ANSWERS:
            return {**doc, "status": "collecting", "reasons": [f"{window['answers']} answers, {MIN_ANSWERS} needed"],
                    "figures": fig}  # fmt: skip
        status, reasons = reference.judge(fig, self.thresholds)
        return {**doc, "status": status, "reasons": reasons, "figures": fig}

    def publish(self, key: str, name: str, version: str, doc: dict[str, Any]) -> None:
        """The document for the API servers (one rename: read whole) and the gauges."""
        doc = {"model": name, "version": version, **doc, "time": time.time()}
        replace_json(document_path(self.run_dir, key), doc)
        m = metrics()
        m.drift_status.labels(name, version).set(STATUS_VALUE[doc["status"]])
        fig = doc["figures"]
        if fig is not None:
            m.drift_psi.labels(name, version).set(fig["psi"])
            m.drift_confidence.labels(name, version).set(fig["mean_confidence"])
            m.drift_low_confidence.labels(name, version).set(fig["low_confidence_share"])
            for channel, shift in enumerate(fig["channel_shift"]):
                m.drift_shift.labels(name, version, str(channel)).set(shift)
        m.drift_answers.labels(name, version).set(doc["window"]["answers"])
