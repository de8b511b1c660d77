"""Where the rows go: Parquet part files, or one CSV or JSONL file, and the bad files, in a folder renamed into place
once every row is in."""

from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modelship.predict import format_row

PART_ROWS = 100_000  # rows per Parquet part file
ROW_GROUP = 8192  # rows the driver holds before it writes them
ERRORS = "_errors.csv"  # the files that could not be scored: "_" keeps Parquet readers from taking it for a part


class Output:
    """The rows, written to `folder` as they arrive: Parquet part files of PART_ROWS rows, or one CSV or JSONL file
    (local predict's lines), and _errors.csv naming every file that could not be scored and why."""

    def __init__(self, folder: Path, fmt: str, logits: bool) -> None:
        self.folder, self.fmt, self.logits = folder, fmt, logits
        self.rows: list[dict[str, Any]] = []  # held until a row group's worth: the driver's memory stays flat
        self.parts = self.scored = self.bad = self.in_part = 0
        self.part: Any = None  # the open part file's writer
        self.schema: Any = None
        self.errors = open(folder / ERRORS, "w", newline="")  # noqa: SIM115 (closed by close())
        self.error_rows = csv.writer(self.errors)
        self.error_rows.writerow(["path", "error"])
        self.text = None if fmt == "parquet" else open(folder / f"predictions.{fmt}", "w", newline="")  # noqa: SIM115
        if self.text is not None and fmt == "csv":
            self.text.write("path,label,index,score,top_k" + (",logits" if logits else "") + "\n")

    def add(self, row: dict[str, Any]) -> None:
        self.scored += 1
        if self.text is None:
            self.rows.append(row)
            if len(self.rows) >= ROW_GROUP:
                self.flush()
        elif self.fmt == "csv" and self.logits:
            line = format_row(row, "csv")
            self.text.write(line[:-1] + "," + " ".join(repr(v) for v in row["logits"]) + "\n")
        else:
            self.text.write(format_row(row, self.fmt))

    def error(self, path: str, reason: str) -> None:
        self.bad += 1
        self.error_rows.writerow([path, reason])

    def flush(self, last: bool = False) -> None:
        """The rows held, as a row group of the open part file; a new part every PART_ROWS rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            if self.part is None:
                self.schema = table.schema
                self.part = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", table.schema)
            self.part.write_table(table)
            self.in_part += len(self.rows)
            self.rows = []
        if self.part is not None and (last or self.in_part >= PART_ROWS):
            self.part.close()
            self.part, self.in_part = None, 0
            self.parts += 1

    def close(self) -> None:
        self.flush(last=True)
        self.errors.close()
        if self.text is not None:
            self.text.close()


def staging(out: Path) -> Path:
    """A fresh folder beside OUT to write into (renamed to OUT once every row is in)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def finish(folder: Path, out: Path) -> None:
    if out.exists():  # --force (checked up front)
        shutil.rmtree(out)
    folder.rename(out)
