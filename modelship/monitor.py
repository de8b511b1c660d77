"""`modelship monitor LOGS --bundle B [--out DIR]`: the drift report of logged payloads, offline, so a person can look
at a week of traffic after an alert.

It reads the JSON lines `serve --log-payloads` wrote, keeps the records of the bundle's model, and per version
compares their answers with the bundle's reference through the same figures the server computes live
(modelship.reference): the class distribution against the reference's, the confidence histogram, PSI and the mean
confidence over time, the input channels' shift, and the status of the last window. Writes `DIR/monitor.json` and
`DIR/report.html`, a page in the style of the run's report.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelship import reference, report
from modelship.errors import DataError
from modelship.files import write_json
from modelship.manifest import check_bundle
from modelship.options import MonitorConfig

log = logging.getLogger(__name__)

PERIOD = 100  # answers a period of the report holds at least


def read_logs(logs: Path) -> tuple[list[dict[str, Any]], int]:
    """Every record of the log (a folder of *.jsonl, or one file), and how many lines could not be read."""
    files = sorted(logs.rglob("*.jsonl")) if logs.is_dir() else [logs]
    if not files:
        raise DataError(f"{logs} holds no payload log (*.jsonl); expected the folder serve --log-payloads wrote")
    records, bad = [], 0
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                bad += 1  # a line a crash cut short: the rest is read
    return records, bad


def answers(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Every answered image of these records, in time order: when, the predicted class, its confidence, the input's
    channel means."""
    rows = [
        (datetime.fromisoformat(r["time"]).timestamp(), a["index"], a["score"], m)
        for r in sorted(records, key=lambda r: r["time"])
        if r.get("answers")
        for a, m in zip(r["answers"], r["input"]["channel_means"], strict=True)
    ]
    return {
        "t": np.asarray([t for t, *_ in rows], np.float64),
        "pred": np.asarray([p for _, p, _, _ in rows], np.int64),
        "conf": np.asarray([c for _, _, c, _ in rows], np.float64),
        "means": np.asarray([m for *_, m in rows], np.float64).reshape(len(rows), -1),
    }


def version_report(ref: dict[str, Any], got: dict[str, np.ndarray], cfg: MonitorConfig) -> dict[str, Any]:
    """One version's figures: over everything logged, over its last window (the status), and per period."""
    last = {k: v[-cfg.window :] for k, v in got.items()}
    window = reference.figures(ref, last["pred"], last["conf"], last["means"])
    status, reasons = reference.judge(window, cfg.thresholds)
    periods = []
    n = len(got["pred"])  # periods of at least PERIOD answers: fewer say more about the sampling than the traffic
    for chunk in np.array_split(np.arange(n), max(1, min(cfg.periods, n // PERIOD))):
        fig = reference.figures(ref, got["pred"][chunk], got["conf"][chunk], got["means"][chunk])
        periods.append({"from": float(got["t"][chunk[0]]), "to": float(got["t"][chunk[-1]]), **fig})
    hist, _ = np.histogram(got["conf"], bins=reference.BINS, range=(0.0, 1.0))
    return {
        "answers": len(got["pred"]),
        "status": status,
        "reasons": reasons,
        "window": window,
        "everything": reference.figures(ref, got["pred"], got["conf"], got["means"]),
        "confidence_counts": hist.tolist(),
        "periods": periods,
    }


def monitor(cfg: MonitorConfig) -> dict[str, Any]:
    """The report of the log against the bundle's reference, written to cfg.out; its document."""
    manifest = check_bundle(cfg.bundle)
    ref = reference.read(cfg.bundle, manifest)
    if ref is None:
        raise DataError(f"bundle {cfg.bundle} has no reference.json to compare with; re-export it with this modelship")
    records, bad = read_logs(cfg.logs)
    mine = [r for r in records if r.get("model") == manifest["name"]]
    if not mine:
        found = sorted({str(r.get("model")) for r in records}) or ["none"]
        raise DataError(f"{cfg.logs} has no record of model {manifest['name']!r} (it has {', '.join(found)})")
    versions = sorted({r["version"] for r in mine}, key=int)
    doc = {
        "model": manifest["name"],
        "logs": str(cfg.logs),
        "records": len(mine),
        "unreadable_lines": bad,
        "failed_requests": sum(1 for r in mine if not r.get("answers")),
        "thresholds": vars(cfg.thresholds),
        "versions": {v: version_report(ref, answers([r for r in mine if r["version"] == v]), cfg) for v in versions},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / "monitor.json", doc)
    report.write(cfg.out / "report.html", page(doc, ref))
    return doc


def page(doc: dict[str, Any], ref: dict[str, Any]) -> str:
    """The report: per version, the status and its reasons, the distributions against the reference, the figures
    over time."""
    body = []
    classes = list(ref["classes"])
    ref_conf = np.asarray(ref["confidence"]["counts"], float) / max(1, ref["images"])
    for version, v in doc["versions"].items():
        w = v["window"]
        tiles = report.tiles(
            [
                ("status", v["status"], f"last {w['answers']} answers"),
                ("PSI", f"{w['psi']:.3f}", "predicted classes"),
                ("mean confidence", f"{w['mean_confidence']:.3f}", f"reference {w['reference_mean_confidence']:.3f}"),
                ("low confidence", f"{w['low_confidence_share']:.3f}", "share; reference 0.05"),
                ("input shift", f"{max(w['channel_shift'], default=0):.3f}", "sd of image means, largest channel"),
            ]
        )
        shares = {"logged": v["everything"]["predicted_share"], "reference": ref["predicted"]["share"]}
        conf = {"logged": list(np.asarray(v["confidence_counts"]) / max(1, v["answers"])), "reference": list(ref_conf)}
        x = [float(i) for i in range(1, len(v["periods"]) + 1)]
        periods = v["periods"]
        psi = {"PSI": [p["psi"] for p in periods]}
        shift = {"largest channel": [max(p["channel_shift"], default=0.0) for p in periods]}
        confidence = {
            "mean": [p["mean_confidence"] for p in periods],
            "low share": [p["low_confidence_share"] for p in periods],
        }
        bins = [f"{i / reference.BINS:.2f}" for i in range(reference.BINS)]
        reasons = (
            "".join(f"<li>{report.esc(r)}</li>" for r in v["reasons"]) or "<li>every figure under its warn line</li>"
        )
        body.append(
            f"<section><h2>version {report.esc(version)}: {v['answers']} answers logged</h2>{tiles}<ul>{reasons}</ul>"
            '<div class="row"><div>'
            + report.bar_chart("predicted classes", classes, shares, "share")
            + "</div><div>"
            + report.bar_chart("top-1 confidence", bins, conf, "share")
            + "</div></div>"
            + '<div class="row"><div>'
            + report.line_chart("PSI of the predicted classes, over time", x, psi, "PSI", "period of the log")
            + "</div><div>"
            + report.line_chart("top-1 confidence, over time", x, confidence, "confidence", "period of the log")
            + "</div><div>"
            + report.line_chart("input shift, over time", x, shift, "sd of image means", "period of the log")
            + "</div></div></section>"
        )
    worst = {"ok": 0, "warn": 1, "drift": 2}
    status = max((v["status"] for v in doc["versions"].values()), key=lambda s: worst[s])
    subtitle = f"{doc['records']} records of {doc['logs']} against the bundle's reference ({ref['images']} images)"
    worst_reasons = [r for v in doc["versions"].values() if v["status"] == status for r in v["reasons"]]
    reason = "" if status == "ok" else f"{status} over the last window: " + "; ".join(dict.fromkeys(worst_reasons))
    return report.page(f"modelship monitor: {doc['model']}", subtitle, status.upper(), reason, "".join(body))
