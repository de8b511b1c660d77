"""`modelship monitor`: flags, config, and the report's summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modelship.cli.args import config_from, default, pair
from modelship.options import MonitorConfig, Thresholds


def add_monitor_args(p: argparse.ArgumentParser) -> None:
    def d(name: str) -> Any:
        return default(MonitorConfig, name)

    p.add_argument(
        "logs", type=Path, metavar="LOGS", help="the folder serve --log-payloads wrote (or one of its files)"
    )
    p.add_argument("--bundle", type=Path, required=True, metavar="BUNDLE_DIR", help="the bundle the log's model ran")
    p.add_argument("--out", type=Path, default=d("out"), metavar="DIR", help="where to write (default %(default)s)")
    p.add_argument("--window", type=int, default=d("window"), metavar="N",
                   help="answers of the last window the status is judged on (default %(default)s)")  # fmt: skip
    p.add_argument("--periods", type=int, default=d("periods"), help="the log cut into periods (default %(default)s)")
    for name in ("psi", "low_confidence", "shift"):
        warn, drift = getattr(Thresholds(), name)
        p.add_argument(f"--drift-{name.replace('_', '-')}", type=pair, default=(warn, drift), metavar="WARN,DRIFT",
                       help=f"as serve's (default {warn:g},{drift:g})")  # fmt: skip


def cmd_monitor(args: argparse.Namespace) -> int:
    from modelship.monitor import monitor

    thresholds = Thresholds(args.drift_psi, args.drift_low_confidence, args.drift_shift)
    doc = monitor(config_from(MonitorConfig, args, thresholds=thresholds))
    for version, v in doc["versions"].items():
        w = v["window"]
        print(f"{doc['model']} version {version}: {v['status']} over the last {w['answers']} of {v['answers']} "
              f"answers (PSI {w['psi']:.3f}, mean confidence {w['mean_confidence']:.3f}, low-confidence share "
              f"{w['low_confidence_share']:.3f}, input shift {max(w['channel_shift'], default=0):.3f})"
              + "".join(f"; {r}" for r in v["reasons"]))  # fmt: skip
    print(args.out / "report.html")
    return 0
