"""`predictions.jsonl`: one JSON object per scored answer, appended batch by batch, read back on a rerun.

A line cut short (the process was killed while writing it) is dropped and the file truncated before it, so a
resumed run writes it again; any other unreadable line is an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataError


class PredictionFile:
    """`predictions.jsonl`: one JSON object per scored answer, appended batch by batch."""

    def __init__(self, path: Path, *, id_field: str):
        self.path, self.id_field = path, id_field
        self.rows: dict[tuple, dict] = {}
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            good = 0
            for n, line in enumerate(lines):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if n == len(lines) - 1:  # a line cut short by a kill: dropped and rewritten
                        break
                    raise DataError(f"{path}:{n + 1}: not valid JSON; remove the file to start over") from None
                self.rows[self.key(row[id_field], row["shots"], row["trial"])] = row
                good += len(line.encode())
            if good != path.stat().st_size:
                with open(path, "r+b") as f:
                    f.truncate(good)

    @staticmethod
    def key(id_, shots: int, trial: int) -> tuple:
        return (json.dumps(id_), shots, trial)

    def __contains__(self, key: tuple) -> bool:
        return key in self.rows

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.rows[self.key(row[self.id_field], row["shots"], row["trial"])] = row
