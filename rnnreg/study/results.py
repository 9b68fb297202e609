"""A study's results: its run directories read back and grouped into the rows of a table.

One idea apart from the document that :mod:`rnnreg.study.report` writes from them: reading and
grouping know run directories and statistics, the report knows sections, tables and figures.
Anything that wants a study's numbers without a report (a notebook, a script) needs only this.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rnnreg.lm.config import CELLS, Config
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import of_events, read_records
from rnnreg.nn.strategies import STRATEGIES
from rnnreg.study.layout import StudyDir

__all__ = ["Group", "RunResult", "Stat", "group_runs", "read_runs"]


@dataclass(frozen=True)
class RunResult:
    """What one run directory recorded."""

    name: str
    path: Path
    config: Config
    epochs: tuple[dict, ...]
    final: dict | None

    @property
    def rate(self) -> float:
        return 0.0 if self.config.strategy == "none" else self.config.strategy_p


def read_runs(out: str | Path) -> list[RunResult]:
    """Every run directory of study directory ``out``, finished or not, in name order."""
    study = StudyDir(out)
    root = study.runs
    if not root.is_dir():
        raise RunDirError(f"{study.path} holds no study (no {root.name}/ directory); run "
                          "`rnnreg compare` first")
    results = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        run = RunDir(path)
        if not run.exists():
            continue  # created but never configured: nothing to report
        records = read_records(run)
        finals = of_events(records, "final")
        results.append(RunResult(path.name, path, run.read_config(),
                                 tuple(of_events(records, "epoch")),
                                 finals[-1] if finals else None))
    return results


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # None for a single seed: one value has no spread to report

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.fmean(values),
                   statistics.stdev(values) if len(values) > 1 else None)

    def text(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Group:
    """The runs of one (cell, strategy, rate): the seeds of one table row."""

    cell: str
    strategy: str
    rate: float
    runs: tuple[RunResult, ...]

    @property
    def label(self) -> str:
        return "none" if self.strategy == "none" else f"{self.strategy} p={self.rate:g}"

    @property
    def finished(self) -> tuple[RunResult, ...]:
        return tuple(r for r in self.runs if r.final is not None)

    def stat(self, measure: str) -> Stat | None:
        return Stat.of([_MEASURES[measure](run) for run in self.finished])

    def curve(self) -> list[dict]:
        """Epoch records averaged over seeds, epoch by epoch, from every run that reached it."""
        by_epoch: dict[int, list[dict]] = {}
        for run in self.runs:
            for record in run.epochs:
                by_epoch.setdefault(record["epoch"], []).append(record)
        return [{"epoch": epoch,
                 "train_ppl": statistics.fmean(r["train_ppl"] for r in records),
                 "valid_ppl": statistics.fmean(r["valid_ppl"] for r in records)}
                for epoch, records in sorted(by_epoch.items())]


def _last_epoch(run: RunResult, key: str) -> float | None:
    return run.epochs[-1][key] if run.epochs else None


def _gap(run: RunResult) -> float | None:
    if not run.epochs:
        return None
    return run.epochs[-1]["valid_ppl"] - run.epochs[-1]["train_ppl"]


def _tokens_per_s(run: RunResult) -> float | None:
    speeds = [r["tokens_per_s"] for r in run.epochs]
    return statistics.fmean(speeds) if speeds else None


_MEASURES: dict[str, Callable[[RunResult], float | None]] = {
    "train": lambda run: _last_epoch(run, "train_ppl"),
    "valid": lambda run: run.final["valid_ppl"],
    "test": lambda run: run.final["test_ppl"],
    "gap": _gap,
    "tokens_per_s": _tokens_per_s,
}


def group_runs(results: Sequence[RunResult]) -> list[Group]:
    """Runs grouped by (cell, strategy, rate), in the order of CELLS, STRATEGIES, then rate."""
    keyed: dict[tuple[str, str, float], list[RunResult]] = {}
    for run in results:
        keyed.setdefault((run.config.cell, run.config.strategy, run.rate), []).append(run)
    order = {name: i for i, name in enumerate(STRATEGIES)}
    keys = sorted(keyed, key=lambda k: (CELLS.index(k[0]), order[k[1]], k[2]))
    return [Group(*key, tuple(keyed[key])) for key in keys]
