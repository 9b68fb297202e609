"""Study directories: the runs of one study, its record and its report, laid out in one place.

Layout of a study directory (``rnnreg compare --out DIR``)::

    study.json         what was launched: grid, base config and data directory; for a plan,
                       the plan's name, the text corpus and its regimes' names
    runs/NAME/         one run directory per grid cell (:class:`rnnreg.lm.rundir.layout.RunDir`)
    corpus/            a recall corpus written for this study (``recall.json`` and the splits)
    REGIME/            for a plan: each regime, itself a study directory
    figures/           the report's figures, KIND-PART.png
    report.md          the report, and the same as one self-contained page: report.html
    ray/               Ray Tune's storage, with ``--backend ray``

:class:`StudyDir` is the one place that knows these names: the grid, the results reader, the
reports and the CLI ask it for a path or for the study's record, so moving a file means
changing one class. What is inside a run directory is :class:`~rnnreg.lm.rundir.layout.RunDir`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from rnnreg.lm.corpus.recall import SPEC_FILE
from rnnreg.lm.rundir.files import StrPath, atomic_write_text

__all__ = ["StudyDir"]


class StudyDir:
    """One study directory: the paths of its parts and its ``study.json`` record."""

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StudyDir({str(self.path)!r})"

    # ------------------------------------------------------------------ the record

    @property
    def record_path(self) -> Path:
        return self.path / "study.json"

    def read_record(self) -> dict:
        """``study.json`` as written, or ``{}`` before the study's first launch."""
        path = self.record_path
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def write_record(self, record: dict) -> None:
        """Write ``study.json`` atomically (indented, so a reader can diff two launches)."""
        atomic_write_text(self.record_path, json.dumps(record, indent=2) + "\n")

    def recorded_data_dir(self) -> str | None:
        """The data directory an earlier launch recorded, if any; an unreadable record is
        treated as none (a resume then needs ``data_dir`` again)."""
        try:
            return self.read_record().get("data_dir")
        except (OSError, ValueError):
            return None

    def is_plan(self) -> bool:
        """Whether this study is a plan of several regimes (``rnnreg compare --plan``)."""
        return "regimes" in self.read_record()

    def regime(self, name: str) -> StudyDir:
        """A regime of a plan: a study directory of its own inside this one."""
        return StudyDir(self.path / name)

    # ------------------------------------------------------------------ runs and corpus

    @property
    def runs(self) -> Path:
        """The folder of run directories."""
        return self.path / "runs"

    def run(self, name: str) -> Path:
        """The run directory of run ``name``."""
        return self.runs / name

    def has_runs(self) -> bool:
        """Whether any run has been started here."""
        return self.runs.is_dir() and any(self.runs.iterdir())

    @property
    def corpus(self) -> Path:
        """Where a recall corpus written for this study lives."""
        return self.path / "corpus"

    def has_recall_corpus(self) -> bool:
        """Whether this study trains on a recall corpus of its own (its task's record is here)."""
        return (self.corpus / SPEC_FILE).is_file()

    @property
    def ray_storage(self) -> Path:
        """Ray Tune's storage for this study's trials."""
        return self.path / "ray"

    # ------------------------------------------------------------------ the report

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def figure(self, kind: str, *parts: str) -> Path:
        """The report's figure of ``kind`` for ``parts`` (a cell, a regime), as a PNG."""
        return self.figures / ("-".join((kind, *parts)) + ".png")

    @property
    def report_markdown(self) -> Path:
        return self.path / "report.md"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    def write_report(self, markdown: str, html: str) -> Path:
        """Write the report's two files atomically; returns the Markdown one's path."""
        atomic_write_text(self.report_markdown, markdown)
        atomic_write_text(self.report_html, html)
        return self.report_markdown

    def relative(self, path: Path) -> Path:
        """``path`` inside this directory as the report links it (relative, so the study can
        move)."""
        return path.relative_to(self.path)
