"""The dropout-strategy study: a grid of ordinary runs, scheduled, resumed, and reported.

Zaremba et al. (2014, section 4.1, Table 1) compare a non-regularized LSTM with one that drops
only non-recurrent connections; Gal & Ghahramani (2016, section 5) add one mask per sequence
and the recurrent connection. A study varies exactly those things (strategy, rate) plus the cell
and the seed, and holds every other setting of one base :class:`~rnnreg.config.Config` equal,
so differences in the report come from dropout alone.

Every grid cell is an ordinary run directory ``out/runs/NAME`` trained by
:func:`rnnreg.train.train`, so ``rnnreg evaluate`` and ``plot`` work on it, and a study
interrupted at any point resumes run by run. Scheduling sits behind :data:`Backend`, a function
given the pending :class:`Job` list: :func:`local_backend` trains on this machine,
:func:`ray_backend` as Ray Tune trials on a local Ray instance or a cluster; the grid and the
report are the same for both.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rnnreg import plots
from rnnreg.config import CELLS, Config
from rnnreg.data import Corpus, DataError, resolve_data_dir
from rnnreg.functional import check_probability
from rnnreg.layers import DropoutMasks
from rnnreg.model import LanguageModel, ModelMasks
from rnnreg.rundir import RunDir, RunDirError, atomic_write_text
from rnnreg.strategies import STRATEGIES
from rnnreg.train import TrainingDiverged, load_model, train

__all__ = ["Backend", "Job", "StudyGrid", "grid_runs", "local_backend", "ray_backend",
           "run_study", "write_report"]

# Tokens of the valid split drawn in the hidden-state heatmaps: enough to see masks persist
# across steps, few enough that every token can be labelled.
HEATMAP_TOKENS = 40


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class StudyGrid:
    """The axes a study varies; everything else comes from the base config unchanged."""

    strategies: tuple[str, ...]
    rates: tuple[float, ...]
    cells: tuple[str, ...]
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        for axis in ("strategies", "rates", "cells", "seeds"):
            values = tuple(getattr(self, axis))
            object.__setattr__(self, axis, values)  # accept lists, store hashable tuples
            if not values:
                raise ValueError(f"a study needs at least one of {axis}")
            if len(set(values)) != len(values):
                raise ValueError(f"{axis} lists a value twice: {list(values)}")
        _check_names("strategy", self.strategies, tuple(STRATEGIES))
        _check_names("cell", self.cells, CELLS)
        for rate in self.rates:
            check_probability("dropout rate", rate)
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seeds must be integers, got {seed!r}")

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def _check_names(kind: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind} name(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(allowed)}")


def grid_runs(base: Config, grid: StudyGrid) -> list[tuple[str, Config]]:
    """One ``(run name, Config)`` per grid cell, differing from ``base`` only on the grid axes.

    ``none`` has no rate to vary, so it gets one run per cell and seed, at rate 0, rather than
    identical copies per rate. Names read like ``lstm-zaremba-p0.5-s1``. Per-placement
    overrides in ``base`` (``recurrent_dropout`` and the like) are held equal too, so they
    apply to every run, ``none`` included.
    """
    runs = []
    for cell in grid.cells:
        for name in grid.strategies:
            rates = (0.0,) if name == "none" else grid.rates
            for rate in rates:
                for seed in grid.seeds:
                    config = base.replace(strategy=name, dropout=float(rate), cell=cell,
                                          seed=seed)
                    runs.append((run_name(config), config))
    return runs


def run_name(config: Config) -> str:
    # repr() is the shortest text that reads back as the same float, so distinct rates never
    # share a directory; ".0" is dropped only to keep the common names short.
    rate = repr(float(config.dropout)).removesuffix(".0")
    return f"{config.cell}-{config.strategy}-p{rate}-s{config.seed}"


# --------------------------------------------------------------------------- scheduling


@dataclass(frozen=True)
class Job:
    """One run to train: picklable, so a backend can ship it to another process or machine."""

    name: str
    config: Config
    run_dir: Path
    data_dir: Path
    resume: bool


# A backend trains every job and calls ``done(job, outcome)`` as each one ends.
Backend = Callable[[Sequence[Job], Callable[[Job, str], None]], None]


def run_job(job: Job, *, progress: bool = False) -> str:
    """Train one job; a diverged run is reported, not raised, so it cannot sink the study.

    A run whose loss went NaN (likely for dropout on the recurrence at high rates, the
    instability Zaremba et al. avoid) keeps its last good checkpoint and is listed in the
    report as unfinished.
    """
    try:
        train(job.config, job.run_dir, data_dir=job.data_dir, resume=job.resume,
              progress=progress, verbose=progress)
    except TrainingDiverged as error:
        return f"diverged: {error}"
    return "finished"


def local_backend(jobs: int = 1, *, progress: bool = True) -> Backend:
    """Runs on this machine: in this process when ``jobs == 1``, else in ``jobs`` processes.

    Workers are spawned, not forked (a forked torch with live threads can deadlock), and split
    the cores between them: ``jobs`` runs each with all cores would only contend for them.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")

    def run(pending: Sequence[Job], done: Callable[[Job, str], None]) -> None:
        if jobs == 1 or len(pending) <= 1:
            for job in pending:
                done(job, run_job(job, progress=progress))
            return
        _run_in_pool(pending, done, min(jobs, len(pending)))

    return run


def _run_in_pool(pending: Sequence[Job], done: Callable[[Job, str], None],
                 workers: int) -> None:
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(run_job, job): job for job in pending}
        remaining = set(futures)
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_EXCEPTION)
            for future in finished:
                done(futures[future], future.result())  # re-raises a worker's error here
    finally:
        # Queued runs never start after an error or Ctrl-C; running ones stop at their next
        # window (train() turns SIGINT into a checkpoint) or finish, so nothing is lost.
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


RAY_MISSING = "the Ray backend needs Ray Tune, an optional extra: pip install 'rnnreg[ray]'"


def ray_backend(address: str | None = None, *, cpus_per_trial: float = 1.0,
                gpus_per_trial: float = 0.0, storage: str | Path | None = None,
                progress: bool = True) -> Backend:
    """Runs every job as a Ray Tune trial: one grid-search trial per pending run.

    ``address`` is passed to ``ray.init``: None starts a local Ray instance, ``"auto"`` joins
    the cluster this machine belongs to, ``"ray://HOST:10001"`` connects through Ray Client.
    A Ray already initialised by the caller is used as it is. Each trial trains an ordinary
    run directory with :func:`rnnreg.train.train`, so on a cluster the study directory and
    the data must be on a filesystem every node mounts at the same path, and rnnreg must be
    installed on every node. Resuming needs nothing from Tune: :func:`run_study` submits only
    the runs that have not finished. ``storage`` is where Tune keeps its own experiment
    records (default: Tune's, ``~/ray_results``).

    Raises ImportError, saying how to install the extra, when Ray is not installed; Ray is
    imported here, never by ``import rnnreg``.
    """
    try:
        import ray
        from ray import tune
    except ImportError as error:
        raise ImportError(f"{RAY_MISSING} ({error})") from error
    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}

    def run(pending: Sequence[Job], done: Callable[[Job, str], None]) -> None:
        if not pending:
            return
        started = not ray.is_initialized()
        if started:
            ray.init(address=address)
        try:
            results = _fit_trials(tune, pending, resources, storage, progress)
        finally:
            if started:
                ray.shutdown()
        _report_trials(results, pending, done)

    return run


def _fit_trials(tune, pending: Sequence[Job], resources: dict, storage: str | Path | None,
                progress: bool):
    # Trials run in other processes whose working directory Tune may change: absolute paths.
    jobs = {job.name: dataclasses.replace(job, run_dir=job.run_dir.resolve(),
                                          data_dir=job.data_dir.resolve()) for job in pending}
    threads = max(1, int(resources["cpu"]))
    trainable = tune.with_resources(tune.with_parameters(_ray_trial, jobs=jobs, threads=threads),
                                    resources)
    tuner = tune.Tuner(
        trainable, param_space={"run": tune.grid_search(list(jobs))},
        run_config=tune.RunConfig(storage_path=None if storage is None else str(storage),
                                  verbose=None if progress else 0))
    return tuner.fit()


def _ray_trial(config: dict, jobs: dict[str, Job], threads: int) -> None:
    """One Tune trial: train its run and report the outcome with the run's final record."""
    torch.set_num_threads(threads)  # as many threads as CPUs reserved, like the local pool
    from ray import tune

    job = jobs[config["run"]]
    outcome = run_job(job)
    finals = [r for r in RunDir(job.run_dir).read_metrics() if r.get("event") == "final"]
    numbers = {k: v for k, v in (finals[-1] if finals else {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    tune.report({"outcome": outcome, **numbers})


def _report_trials(results, pending: Sequence[Job], done: Callable[[Job, str], None]) -> None:
    """Hand each finished trial to ``done``; then raise if any trial failed, as the pool does."""
    by_name = {job.name: job for job in pending}
    failed = []
    for result in results:
        name = result.config["run"]
        if result.error is not None:
            failed.append(f"{name}: {result.error}")
        else:
            done(by_name[name], result.metrics["outcome"])
    if failed:
        raise RuntimeError(f"{len(failed)} Ray trial(s) failed; rerun the same command to "
                           "retry them:\n" + "\n".join(failed))


def run_study(base: Config, grid: StudyGrid, out: str | Path, *,
              data_dir: str | Path | None = None, jobs: int = 1, progress: bool = True,
              backend: Backend | None = None) -> Path:
    """Train every run of the grid under ``out/runs``, resuming whatever was interrupted.

    A run with a "final" metrics record is done and skipped; a run with a saved config is
    resumed from its checkpoint; the others start. Writes ``out/study.json`` (grid, base config,
    data directory) and returns ``out``. ``backend`` replaces the local one (``jobs`` is then
    ignored).
    """
    out = Path(out)
    runs = grid_runs(base, grid)
    data = resolve_data_dir(data_dir).resolve()
    # Planned before anything is written, so a clash with an earlier study changes nothing.
    pending = [job for job in (_job(out, name, config, data) for name, config in runs)
               if job is not None]
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps({
        "grid": grid.to_dict(), "base": base.to_dict(), "data_dir": str(data),
        "runs": [name for name, _ in runs]}, indent=2) + "\n")
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="study", unit="run",
               disable=not progress)

    def done(job: Job, outcome: str) -> None:
        bar.update(1)
        bar.set_postfix_str(job.name, refresh=False)
        if outcome != "finished":
            tqdm.write(f"{job.name}: {outcome}")

    try:
        (backend or local_backend(jobs, progress=progress))(pending, done)
    finally:
        bar.close()
    return out


def _job(out: Path, name: str, config: Config, data_dir: Path) -> Job | None:
    """The job for one run, or None when it is already done."""
    run = RunDir(out / "runs" / name)
    if not run.exists():
        return Job(name, config, run.path, data_dir, resume=False)
    saved = Config.from_dict(run.read_config()["config"])
    if saved != config:
        changed = sorted(f.name for f in fields(Config)
                         if getattr(saved, f.name) != getattr(config, f.name))
        raise RunDirError(f"{run.path} was trained with different settings ({', '.join(changed)})"
                          "; use another output directory for a different study")
    if any(r.get("event") == "final" for r in run.read_metrics()):
        return None
    # With no checkpoint yet, resume=True restarts from the saved config and vocabulary.
    return Job(name, config, run.path, data_dir, resume=True)


# --------------------------------------------------------------------------- results


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
        return 0.0 if self.config.strategy == "none" else self.config.dropout


def read_runs(out: str | Path) -> list[RunResult]:
    """Every run directory under ``out/runs``, finished or not, in name order."""
    root = Path(out) / "runs"
    if not root.is_dir():
        raise RunDirError(f"{Path(out)} holds no study (no runs/ directory); run "
                          "`rnnreg compare` first")
    results = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        run = RunDir(path)
        if not run.exists():
            continue  # created but never configured: nothing to report
        records = run.read_metrics()
        finals = [r for r in records if r.get("event") == "final"]
        results.append(RunResult(
            path.name, path, Config.from_dict(run.read_config()["config"]),
            tuple(r for r in records if r.get("event") == "epoch"),
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


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int = 2

    def markdown(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self, out: Path) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class _Paragraph:
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self, out: Path) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class _Bullets:
    items: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self, out: Path) -> str:
        items = "".join(f"<li>{html.escape(item)}</li>" for item in self.items)
        return f"<ul>{items}</ul>"


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        lines = [self.header, tuple("---" for _ in self.header), *self.rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)

    def html(self, out: Path) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass(frozen=True)
class _Image:
    path: Path     # relative to the study directory, so report.md works wherever it is moved
    caption: str

    def markdown(self) -> str:
        return f"![{self.path.stem}]({self.path.as_posix()})\n\n*{self.caption}*"

    def html(self, out: Path) -> str:
        # Embedded, so report.html is one self-contained file that can be mailed or archived.
        data = base64.b64encode((out / self.path).read_bytes()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{self.path.stem}">'
                f"<figcaption>{html.escape(self.caption)}</figcaption></figure>")


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;"
          "padding:.25em .6em;text-align:right}img{max-width:100%}"
          "figcaption{font-style:italic;color:#444}")


def write_report(out: str | Path, *, data_dir: str | Path | None = None) -> Path:
    """Write ``out/report.md`` and a self-contained ``out/report.html``; returns the .md path.

    Reads only the run directories, so it can be regenerated at any time, also mid-study.
    ``data_dir`` (for the hidden-state heatmaps) defaults to the one in ``study.json``.
    """
    out = Path(out)
    groups = group_runs(read_runs(out))
    if not groups:
        raise RunDirError(f"{out / 'runs'} holds no run yet; nothing to report")
    study = _read_study(out)
    data = data_dir if data_dir is not None else study.get("data_dir")
    figures = out / "figures"
    blocks = [_Heading("Dropout-strategy study", 1), *_overview(study, groups),
              _Heading("What the numbers say"), _Bullets(tuple(_findings(groups))),
              *_tables(groups), *_curves(out, figures, groups), *_rates(out, figures, groups),
              *_heatmaps(out, figures, groups, data), *_placements(out, figures, groups)]
    markdown = "\n\n".join(block.markdown() for block in blocks) + "\n"
    body = "\n".join(block.html(out) for block in blocks)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Dropout-strategy study</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"))
    return out / "report.md"


def _read_study(out: Path) -> dict:
    path = out / "study.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _overview(study: dict, groups: Sequence[Group]) -> list:
    runs = [run for group in groups for run in group.runs]
    unfinished = [run.name for run in runs if run.final is None]
    blocks = [_Paragraph(f"{len(runs)} runs, {len(runs) - len(unfinished)} finished. Each row "
                         "below is the mean ± standard deviation over seeds (no deviation for "
                         "a single seed).")]
    if "base" in study:
        base = Config.from_dict(study["base"])
        blocks.append(_Paragraph(
            f"Held equal in every run: {base.num_layers} layers of {base.hidden_size} units, "
            f"{base.epochs} epochs, batch {base.batch_size}, bptt {base.bptt}, lr {base.lr:g} "
            f"decayed by {base.lr_decay:g} after epoch {base.decay_after}; "
            f"data from {study.get('data_dir')}."))
    if unfinished:
        blocks.append(_Paragraph("No final record (still running, interrupted or diverged): "
                                 + ", ".join(unfinished) + "."))
    return blocks


def _findings(groups: Sequence[Group]) -> list[str]:
    """Plain statements computed from the numbers; nothing beyond what the table shows."""
    findings = []
    for cell in dict.fromkeys(g.cell for g in groups):
        ranked = sorted((g for g in groups if g.cell == cell and g.stat("valid")),
                        key=lambda g: g.stat("valid").mean)
        if not ranked:
            continue
        best = ranked[0]
        findings.append(f"{cell}: lowest valid perplexity {best.stat('valid').text()} from "
                        f"{best.label} (test {best.stat('test').text()}, "
                        f"{len(best.finished)} seed(s)).")
        if len(ranked) > 1:
            findings.append(_runner_up(cell, best, ranked[1]))
        findings.extend(_gap_finding(cell, ranked))
    findings.extend(_overfitting(groups))
    return findings or ["No run has finished yet."]


def _runner_up(cell: str, best: Group, second: Group) -> str:
    first, other = best.stat("valid"), second.stat("valid")
    # Two decimals: the difference between close configurations would round away at one.
    difference = other.mean - first.mean
    text = f"{cell}: next is {second.label} at {other.text()}, {difference:.2f} higher"
    if first.std is not None and other.std is not None:
        spread = max(first.std, other.std)
        relation = "smaller" if difference < spread else "not smaller"
        text += (f"; the difference is {relation} than the larger of their seed standard "
                 f"deviations ({spread:.2f})")
    return text + "."


def _gap_finding(cell: str, ranked: Sequence[Group]) -> list[str]:
    """The generalization gap of `none` against Zaremba's placement at its best rate."""
    none = next((g for g in ranked if g.strategy == "none"), None)
    zaremba = next((g for g in ranked if g.strategy == "zaremba"), None)  # ranked: best rate
    if none is None or zaremba is None or not (none.stat("gap") and zaremba.stat("gap")):
        return []
    return [f"{cell}: valid − train gap at the last epoch is {none.stat('gap').text()} without "
            f"dropout and {zaremba.stat('gap').text()} for {zaremba.label} (its lowest-valid "
            f"rate); the train perplexity is measured with dropout active."]


def _overfitting(groups: Sequence[Group]) -> list[str]:
    """Configurations whose mean valid perplexity rose after its minimum: overfitting."""
    rose = []
    for group in groups:
        curve = group.curve()
        if len(curve) < 2:
            continue
        lowest = min(curve, key=lambda r: r["valid_ppl"])
        last = curve[-1]
        if last["valid_ppl"] > lowest["valid_ppl"]:
            rose.append(f"{group.cell} {group.label}: mean valid perplexity was lowest at epoch "
                        f"{lowest['epoch']} ({lowest['valid_ppl']:.2f}) and rose to "
                        f"{last['valid_ppl']:.2f} by epoch {last['epoch']}.")
    if not rose and any(len(g.curve()) > 1 for g in groups):
        return ["No configuration's mean valid perplexity rose after its minimum."]
    return rose


_COLUMNS = ("cell", "p", "seeds", "train ppl", "valid ppl", "test ppl", "gap (valid − train)",
            "tokens/s")


def _tables(groups: Sequence[Group]) -> list:
    blocks = [_Heading("Perplexity by strategy"), _Paragraph(
        "train: the last epoch's training perplexity, averaged over its windows with dropout "
        "active, as the trainer logs it; valid and test: the final model scored as one stream; "
        "gap: valid − train of the last epoch record; tokens/s: training speed averaged over "
        "epochs, which depends on how many runs shared the machine.")]
    for name in dict.fromkeys(g.strategy for g in groups):
        rows = tuple(_row(g) for g in groups if g.strategy == name and g.finished)
        blocks.append(_Heading(f"{name}: {STRATEGIES[name].description}", 3))
        blocks.append(_Table(_COLUMNS, rows) if rows else _Paragraph("No finished run."))
    return blocks


def _row(group: Group) -> tuple[str, ...]:
    def text(measure: str, digits: int = 1) -> str:
        stat = group.stat(measure)
        return "–" if stat is None else stat.text(digits)

    return (group.cell, f"{group.rate:g}", str(len(group.finished)), text("train"),
            text("valid"), text("test"), text("gap"), text("tokens_per_s", 0))


def _curves(out: Path, figures: Path, groups: Sequence[Group]) -> list:
    blocks = [_Heading("Learning curves"), _Paragraph(
        "Mean over seeds. A valid curve that turns up while the train curve keeps falling is "
        "overfitting, the failure dropout is meant to prevent.")]
    for cell in dict.fromkeys(g.cell for g in groups):
        path = plots.learning_curves({g.label: g.curve() for g in groups if g.cell == cell},
                                     figures / f"curves-{cell}.png",
                                     title=f"{cell}: train and valid perplexity per epoch")
        blocks.append(_Image(path.relative_to(out), f"Learning curves, {cell}"))
    return blocks


def _rates(out: Path, figures: Path, groups: Sequence[Group]) -> list:
    blocks = [_Heading("Perplexity against dropout rate")]
    for cell in dict.fromkeys(g.cell for g in groups):
        series: dict[str, list[dict]] = {}
        for group in groups:
            valid, test = group.stat("valid"), group.stat("test")
            if group.cell == cell and valid is not None:
                series.setdefault(group.strategy, []).append({
                    "rate": group.rate, "valid": valid.mean, "valid_std": valid.std,
                    "test": test.mean, "test_std": test.std})
        if series:
            path = plots.rate_curve(series, figures / f"rates-{cell}.png",
                                    title=f"{cell}: final perplexity (mean ± std over seeds)")
            blocks.append(_Image(path.relative_to(out), f"Perplexity against rate, {cell}; "
                                 "a strategy with a single rate is a dotted reference line"))
    return blocks


def _heatmaps(out: Path, figures: Path, groups: Sequence[Group],
              data_dir: str | Path | None) -> list:
    blocks = [_Heading("Hidden states on real text")]
    finished = [run for group in groups for run in group.finished]
    if not finished:
        return [*blocks, _Paragraph("No finished run to draw.")]
    # The largest output rate shows masking most plainly; the paper's placement breaks ties.
    run = max(finished, key=lambda r: (r.config.layer_dropout()["output_dropout"],
                                       r.config.strategy == "zaremba", r.name))
    model, vocab, config = load_model(run.path, device="cpu")
    try:
        corpus = Corpus.load(data_dir, config.level, vocab)
    except DataError as error:
        return [*blocks, _Paragraph(f"Skipped: the valid split could not be read ({error}).")]
    ids = corpus.valid[:HEATMAP_TOKENS].unsqueeze(1)
    path = plots.hidden_heatmaps(_hidden_panels(model, ids), figures / "hidden-states.png",
                                 tokens=vocab.decode(ids[:, 0]),
                                 title=f"{run.name}: last layer's output after output dropout")
    blocks.append(_Image(path.relative_to(out), (
        f"Trained weights of {run.name} on the first {ids.size(0)} tokens of the valid split. "
        "Same weights, placements and rates in every panel; only how often the masks are "
        "redrawn differs. One mask per sequence blanks the same units at every step.")))
    return blocks


@torch.no_grad()
def _hidden_panels(model: LanguageModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dropped`` outputs ``(T, H)`` under no dropout, per-step masks and per-sequence masks.

    Both schemes come from ``model.sample_masks`` at the model's own placements and rates: one
    draw is held for the whole sequence (Gal & Ghahramani 2016), or a new draw is taken at
    every step (Zaremba et al. 2014), whichever the model was trained with. A fixed seed in a
    forked RNG makes the figure reproducible without disturbing the caller's random state.
    """
    model.eval()
    steps = ids.size(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = [model.sample_masks(1, ids.size(1)) for _ in range(steps)]
    return {
        "no dropout": model(ids).dropped[:, 0],
        "fresh mask each step": model(ids, None, _per_step(draws)).dropped[:, 0],
        "one mask per sequence": model(ids, None, draws[0]).dropped[:, 0],
    }


def _per_step(draws: Sequence[ModelMasks]) -> ModelMasks:
    """Stack single-step draws along time; weight and word masks are per call, so keep one."""
    def stack(masks):
        return None if masks[0] is None else torch.cat(masks)

    rnn = [d.rnn for d in draws]
    first = draws[0]
    return ModelMasks(first.words, DropoutMasks(
        input=stack([m.input for m in rnn]),
        between=tuple(stack(list(layer)) for layer in zip(*(m.between for m in rnn))),
        recurrent=tuple(stack(list(layer)) for layer in zip(*(m.recurrent for m in rnn))),
        weight=first.rnn.weight,
        output=stack([m.output for m in rnn]),
    ), stack([d.output for d in draws]))


def _placements(out: Path, figures: Path, groups: Sequence[Group]) -> list:
    blocks = [_Heading("Where each strategy drops"), _Paragraph(
        "Drawn from the dropout settings held by a model built from each strategy's run "
        "config (at its highest rate), not from a table, so they cannot disagree with the "
        "code. Other rates place dropout identically.")]
    for name in dict.fromkeys(g.strategy for g in groups):
        run = max((r for g in groups if g.strategy == name for r in g.runs),
                  key=lambda r: (r.rate, r.name))
        # The vocabulary size does not affect where dropout acts; 2 keeps the model tiny.
        model = LanguageModel(2, run.config)
        title = name if name == "none" else f"{name}, p={run.rate:g}"
        path = plots.placement_diagram(model, figures / f"placement-{name}.png", title=title)
        blocks.append(_Image(path.relative_to(out),
                             f"{name}: {STRATEGIES[name].description}"))
    return blocks
