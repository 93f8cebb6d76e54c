"""Metrics sinks: a CSV file and TensorBoard event files in the run folder (rank 0 only)."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLogger:
    """`log(step, {"loss": ..., "lr": ...})` appends to metrics.csv and TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._fields: list[str] | None = None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a declared dependency
                self._tb = None
        if enabled and self.path.exists():  # resumed run: keep appending under the same header
            with self.path.open() as f:
                header = f.readline().strip()
            self._fields = header.split(",") if header else None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        if self._fields is None:
            self._fields = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._fields)
        elif any(k not in self._fields for k in row):  # a new column (e.g. the online kNN): widen the file
            self._widen([k for k in row if k not in self._fields])
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self._fields])
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)

    def _widen(self, new: list[str]) -> None:
        """Rewrite metrics.csv with `new` columns appended (empty in earlier rows); temp name + rename."""
        with self.path.open(newline="") as f:
            rows = list(csv.reader(f))[1:]
        self._fields = [*self._fields, *new]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self._fields)
            w.writerows(r + [""] * (len(self._fields) - len(r)) for r in rows)
        tmp.replace(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
