"""The dropout-strategy study: a grid of ordinary runs, scheduled, resumed, and reported.

Zaremba et al. (2014, section 4.1, Table 1) compare a non-regularized LSTM with one that drops
only non-recurrent connections; Gal & Ghahramani (2016, section 5) add one mask per sequence
and the recurrent connection. A study varies exactly those things (strategy, rate) plus the cell
and the seed, and holds every other setting of one base :class:`~rnnreg.lm.config.Config` equal,
so differences in the report come from dropout alone.

Every grid cell is an ordinary run directory in the study directory
(:class:`~rnnreg.study.layout.StudyDir`) trained by
:func:`rnnreg.lm.training.loop.train`, so ``rnnreg evaluate`` and ``plot`` work on it, and a study
interrupted at any point resumes run by run. Scheduling sits behind :data:`Backend`, a function
given the pending :class:`Job` list: :func:`local_backend` trains on this machine,
:func:`ray_backend` as Ray Tune trials on a local Ray instance or a cluster; the grid and the
report are the same for both.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tqdm.auto import tqdm

from rnnreg.lm.config import CELLS, Config
from rnnreg.lm.corpus.recall import RecallTask
from rnnreg.lm.corpus.sources import locate_corpus
from rnnreg.lm.presets import preset_config
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.rundir.metrics import read_records
from rnnreg.lm.training.loop import TrainingDiverged, train
from rnnreg.nn.functional import check_positive_int, check_probability
from rnnreg.nn.strategies import STRATEGIES
from rnnreg.study.layout import StudyDir

__all__ = ["PLANS", "Backend", "Job", "Regime", "StudyGrid", "grid_runs", "local_backend",
           "ray_backend", "run_job", "run_name", "run_plan", "run_study"]



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
                    config = base.replace(strategy=name, strategy_p=float(rate), cell=cell,
                                          seed=seed)
                    runs.append((run_name(config), config))
    return runs


def run_name(config: Config) -> str:
    # repr() is the shortest text that reads back as the same float, so distinct rates never
    # share a directory; ".0" is dropped only to keep the common names short.
    rate = repr(float(config.strategy_p)).removesuffix(".0")
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
    check_positive_int("jobs", jobs)

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
            # Each run as it ends (a study's progress), a worker's error as soon as it happens.
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                done(futures[future], future.result())  # re-raises a worker's error here
    finally:
        # Queued runs never start after an error or Ctrl-C; running ones stop at their next
        # window (train() turns SIGINT into a checkpoint) or finish, so nothing is lost.
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


_RAY_MISSING = "the Ray backend needs Ray Tune, an optional extra: pip install 'rnnreg[ray]'"


def ray_backend(address: str | None = None, *, cpus_per_trial: float = 1.0,
                gpus_per_trial: float = 0.0, storage: str | Path | None = None,
                progress: bool = True) -> Backend:
    """Runs every job as a Ray Tune trial: one grid-search trial per pending run.

    ``address`` is passed to ``ray.init``: None starts a local Ray instance, ``"auto"`` joins
    the cluster this machine belongs to, ``"ray://HOST:10001"`` connects through Ray Client.
    A Ray already initialised by the caller is used as it is. Each trial trains an ordinary
    run directory with :func:`rnnreg.lm.training.loop.train`, so on a cluster the study directory
    and the data must be on a filesystem every node mounts at the same path, and rnnreg must be
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
        raise ImportError(f"{_RAY_MISSING} ({error})") from error
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
    finals = read_records(job.run_dir, "final")
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


def run_study(base: Config, grid: StudyGrid | Sequence[StudyGrid], out: str | Path, *,
              data_dir: str | Path | None = None, jobs: int = 1, progress: bool = True,
              backend: Backend | None = None) -> Path:
    """Train every run of the grid under ``out/runs``, resuming whatever was interrupted.

    A run with a "final" metrics record is done and skipped; a run with a saved config is
    resumed from its checkpoint; the others start. Writes ``out/study.json`` (grid, base config,
    data directory) and returns ``out``. Resuming a study without ``data_dir`` uses the one
    ``study.json`` recorded (each resumed run also checks its files' MD5s). ``backend``
    replaces the local one (``jobs`` is then ignored). Several grids train their union (a run
    two grids share trains once).
    """
    study = StudyDir(out)
    data = locate_corpus(data_dir, study.recorded_data_dir()).path.resolve()
    pending, total = _prepare(base, _grids(grid), study, data)
    _train(pending, total, jobs=jobs, progress=progress, backend=backend)
    return study.path


def _grids(grid: StudyGrid | Sequence[StudyGrid]) -> tuple[StudyGrid, ...]:
    return (grid,) if isinstance(grid, StudyGrid) else tuple(grid)


def _prepare(base: Config, grids: Sequence[StudyGrid], study: StudyDir,
             data: Path) -> tuple[list[Job], int]:
    """Plan one study directory: write its record; return its unfinished jobs and size."""
    runs = dict(run for grid in grids for run in grid_runs(base, grid))
    # Planned before anything is written, so a clash with an earlier study changes nothing.
    pending = [job for job in (_job(study, name, config, data) for name, config in runs.items())
               if job is not None]
    study.runs.mkdir(parents=True, exist_ok=True)
    grid_record = ([g.to_dict() for g in grids] if len(grids) > 1 else grids[0].to_dict())
    study.write_record({"grid": grid_record, "base": base.to_dict(), "data_dir": str(data),
                        "runs": list(runs)})
    return pending, len(runs)


def _train(pending: Sequence[Job], total: int, *, jobs: int, progress: bool,
           backend: Backend | None) -> None:
    bar = tqdm(total=total, initial=total - len(pending), desc="study", unit="run",
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


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Regime:
    """One base configuration on one corpus, and the grids of runs trained there.

    A claim of the tutorial holds only where its premise does: "dropout beats no dropout"
    needs a model that overfits without it, "per-step masks destroy memory" needs tokens that
    only memory predicts. A regime is built for one such premise; a plan is a few of them.
    The base is a preset with ``overrides``; ``recall`` is None for the corpus the user gives
    (``--data-dir``, e.g. PTB), otherwise the regime trains on the recall corpus that task
    writes into the study directory.
    """

    name: str
    preset: str
    grids: tuple[StudyGrid, ...]
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    recall: RecallTask | None = None

    @property
    def base(self) -> Config:
        return preset_config(self.preset).replace(**self.overrides)


HIGH_RATE, LOW_RATE = 0.5, 0.2  # the tutorial's advice (0.5-0.7) against a low rate
_LSTM_STRATEGIES = ("none", "zaremba", "naive", "recurrent_only", "variational")
_MEMORY_STRATEGIES = ("zaremba", "naive", "variational")
# The tanh RNN diverges at the LSTM's learning rate (its gradient is clipped at norm 5, but
# every step of lr 1 still throws it out of tanh's range): it gets its own regimes at 0.1.
_RNN_LR = 0.1


def _regimes(seeds: tuple[int, ...], text: str, recall: str, recall_task: RecallTask,
             text_overrides: Mapping[str, Any] = MappingProxyType({}),
             recall_overrides: Mapping[str, Any] = MappingProxyType({})) -> tuple[Regime, ...]:
    """The four regimes every plan has, at its own size.

    text: every placement on the LSTM at the high rate, zaremba at the low rate, none against
    zaremba on the GRU; text-rnn: none against zaremba on the tanh RNN; memory and memory-rnn:
    zaremba, naive and variational on the recall corpus.
    """
    rnn = {**text_overrides, "lr": _RNN_LR}
    recall_rnn = {**recall_overrides, "lr": _RNN_LR}
    return (
        Regime("text", text, (StudyGrid(_LSTM_STRATEGIES, (HIGH_RATE,), ("lstm",), seeds),
                              StudyGrid(("zaremba",), (LOW_RATE,), ("lstm",), seeds),
                              StudyGrid(("none", "zaremba"), (HIGH_RATE,), ("gru",), seeds)),
               text_overrides),
        Regime("text-rnn", text,
               (StudyGrid(("none", "zaremba"), (HIGH_RATE,), ("rnn",), seeds),), rnn),
        Regime("memory", recall,
               (StudyGrid(_MEMORY_STRATEGIES, (HIGH_RATE,), ("lstm",), seeds),),
               recall_overrides, recall_task),
        Regime("memory-rnn", recall,
               (StudyGrid(_MEMORY_STRATEGIES, (HIGH_RATE,), ("rnn",), seeds),),
               recall_rnn, recall_task),
    )


# Plans as data. default: 3 seeds, 41 minutes on 2 shared CPU cores (results/strategy-study).
# quick: a few minutes, a first look at the tables and figures (2 seeds and small models: its
# intervals are wide, so expect "inconclusive"). gpu: the paper's medium model on all of PTB
# and a recall corpus with distances up to 160, 5 seeds (a design: no GPU has run it yet).
PLANS = MappingProxyType({
    "default": _regimes((1, 2, 3), "study-text", "study-recall",
                        RecallTask(segments=(3000, 300, 1000))),
    "quick": _regimes((1, 2), "study-text", "study-recall",
                      RecallTask(distances=(2, 6, 18), segments=(1000, 100, 300)),
                      dict(hidden_size=64, num_layers=1, train_tokens=20_000, max_vocab=1000,
                           epochs=3, decay_after=2, eval_tokens=3000),
                      dict(hidden_size=48, bptt=20, epochs=4, decay_after=3)),
    "gpu": _regimes((1, 2, 3, 4, 5), "medium", "study-recall",
                    RecallTask(distances=(2, 5, 10, 20, 40, 80, 160),
                               segments=(40_000, 2000, 4000)),
                    {}, dict(hidden_size=650, num_layers=2, bptt=200, init_range=0.05,
                             epochs=20, decay_after=12)),
})


def run_plan(plan: str, out: str | Path, *, data_dir: str | Path | None = None,
             jobs: int = 1, progress: bool = True, backend: Backend | None = None,
             overrides: dict | None = None) -> Path:
    """Train every regime of plan ``plan``, each an ordinary study in ``out/REGIME``.

    All regimes' runs go to one backend call, so parallel workers stay busy across regime
    boundaries. ``out/study.json`` names the plan and its regimes (what the report reads);
    ``data_dir`` is the corpus of the regimes without a recall task (resumes reuse the
    recorded one). ``overrides`` (Config fields) apply to every regime's base, as flags
    override a preset.
    """
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    study = StudyDir(out)
    recorded = study.read_record()
    if recorded and recorded.get("plan") != plan:
        raise RunDirError(f"{study.path} holds a study of plan {recorded.get('plan')!r}; use "
                          "another output directory for another plan")
    text_data = locate_corpus(data_dir, recorded.get("data_dir")).path.resolve()
    pending, total = [], 0
    for regime in PLANS[plan]:
        regime_dir = study.regime(regime.name)
        data = (text_data if regime.recall is None
                else regime.recall.write(regime_dir.corpus).resolve())
        base = regime.base.replace(**(overrides or {}))
        jobs_of, size = _prepare(base, regime.grids, regime_dir, data)
        pending += jobs_of
        total += size
    study.write_record({"plan": plan, "data_dir": str(text_data),
                        "regimes": [regime.name for regime in PLANS[plan]]})
    # Seed by seed: a study stopped early still has every arm, with fewer seeds.
    pending.sort(key=lambda job: job.config.seed)
    _train(pending, total, jobs=jobs, progress=progress, backend=backend)
    return study.path


def _job(study: StudyDir, name: str, config: Config, data_dir: Path) -> Job | None:
    """The job for one run, or None when it is already done."""
    run = RunDir(study.run(name))
    if not run.exists():
        return Job(name, config, run.path, data_dir, resume=False)
    saved = run.read_config()
    if saved != config:
        changed = sorted(f.name for f in fields(Config)
                         if getattr(saved, f.name) != getattr(config, f.name))
        raise RunDirError(f"{run.path} was trained with different settings ({', '.join(changed)})"
                          "; use another output directory for a different study")
    if read_records(run, "final"):
        return None
    # With no checkpoint yet, resume=True restarts from the saved config and vocabulary.
    return Job(name, config, run.path, data_dir, resume=True)
