"""One prepared GPU check, a lease profile: machine, speed tables, kernel profile, CUDA tests.

    bash benchmarks/device_check.sh OUTDIR            # on a machine with a GPU (docs/gpu-check.md)
    bash benchmarks/device_check.sh OUTDIR --quick    # CPU rehearsal: same stages, tiny sizes

GPU time often comes in short leases (machine start included), so everything runs in one call
that stops itself before its budget (default 300 s, which leaves room in a 15-minute lease for
the machine's start and one rerun): each stage is a subprocess in its own process group with
its own time limit, cut to what is left, and is stopped (SIGTERM, or SIGINT for pytest, then
SIGKILL) when it overruns, so a slow stage cannot eat the call. Stages, in order of what
matters most:

1. deps, install: the project without downloading another torch (``pip install --no-deps
   --no-build-isolation --no-index -e .``; wheels in ``.whl/`` for any missing small
   dependency; PYTHONPATH in any case);
2. machine: torch, Triton, CUDA and the device as the stages see them, and rnnreg imported from
   this checkout (without CUDA the GPU check stops here);
3. layers: benchmarks/layers.py's engines table at the paper's medium and large shapes: the
   fused and the two-kernel Triton step, the Python loop and ``nn.LSTM(dropout)`` (cuDNN) for
   per-sequence masks and zoneout, in fp32, fp32 with cuDNN's RNN in IEEE float32, and bf16,
   each beside benchmarks/perf_model.py's PREDICTION, with the precision settings in effect;
4. profile: benchmarks/launch_bound.py, launches and busy time against cuDNN, and the
   costliest kernels of one own-loop iteration (torch.profiler);
5. cuda-triton, then cuda-other: ``pytest -m cuda tests``, the Triton engine's tests first,
   each test and the whole stage under a time limit (benchmarks/pytest_limits.py), JUnit XML
   written even when a limit cuts the stage;
6. the training rows, only if time is left: all at once as concurrent processes on the one
   device (a run at the paper's batch 20 is small work for a large GPU): ``rnnreg train``
   for medium, large, variational-medium and variational-large, and an ``rnnreg compare``
   strategy study at the medium size, its runs in parallel (on a GPU, rows that would leave a
   process without a CPU core are skipped). Every row has a time limit, cut to the budget
   left, and a training budget (``--max-train-minutes``) fitted inside it; a row cut short by
   either is labelled PARTIAL with the epochs it did, its last valid/test perplexity and
   tokens/s.

OUTDIR receives at most 8 files, all at its top level, rewritten after every stage so that a
call killed from outside still returns what was done: ``summary.md`` (command, commit, device,
stages with start times, results and every table), ``layers.md``, ``kernels.md``,
``cuda-triton.xml``, ``cuda-other.xml``, ``training.md`` (one line per run), ``logs.tar.gz``
(every stage's full log) and ``runs.tar.gz`` (the run and study directories, metrics.jsonl
included, without checkpoints). The summary is printed last. Ctrl-C or SIGTERM stops every
stage's process group and still writes the results.

``--quick`` runs the same stages on the CPU with tiny shapes and a tiny corpus it writes
itself (the CUDA tests run on the CPU through ``RNNREG_CHECK_DEVICE=cpu``), so the plumbing is
tested on machines without a GPU; its numbers mean nothing.

PTB is read from ``$RNNREG_DATA``, else ``data/ptb`` in the checkout. rnnreg is driven through
its command line and the benchmark scripts only, and only the standard library is imported
here: a broken torch or rnnreg shows up as a failed stage, not as a crashed check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
# Imported by rnnreg, its tests or benchmarks and not part of torch; torch itself is the
# machine's and is never installed here.
DEPENDENCIES = ("numpy", "safetensors", "tqdm", "matplotlib", "tensorboard", "filelock", "pytest",
                "hypothesis")
MACHINE_PROBE = """
import json, os, platform, sys, rnnreg, torch
if not rnnreg.__file__.startswith(sys.argv[1]):
    sys.exit(f"rnnreg resolves to {rnnreg.__file__}, not to the checkout {sys.argv[1]}")
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cpus": os.cpu_count(), "rnnreg": rnnreg.__file__}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
"""
POLL_SECONDS = 0.2  # how often running stages are checked against their limits
# The smallest training budget a row is given (`--max-train-minutes 0` would mean no limit).
MIN_TRAIN_MINUTES = 0.01
TINY = ("--hidden-size", "16", "--batch-size", "4", "--bptt", "5", "--eval-bptt", "50")


@dataclass(frozen=True)
class Row:
    """One training row: ``rnnreg train --preset PRESET``, or, with ``strategies``, a study
    (``rnnreg compare``) of those strategies at ``rates`` on that preset, all its runs at once."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    rates: tuple[float, ...] = ()
    limit: float | None = None       # seconds; None: the profile's row_limit

    @property
    def runs(self) -> int:
        """The runs it trains at once (a study's grid: ``none`` has no rate, so runs once)."""
        if not self.strategies:
            return 1
        return sum(1 if name == "none" else len(self.rates) for name in self.strategies)

    @property
    def processes(self) -> int:
        """Processes on the device: a study's parent process comes on top of its runs."""
        return self.runs + 1 if self.strategies else 1

    def command(self, data: Path, out: Path, device: str, minutes: float) -> list[str]:
        shared = ["--preset", self.preset, "--data-dir", str(data), "--out", str(out),
                  "--device", device, "--no-progress", "--checkpoint-minutes", "0",
                  "--max-train-minutes", _minutes(minutes)]
        if not self.strategies:
            return [sys.executable, "-m", "rnnreg", "train", *shared, *self.overrides]
        return [sys.executable, "-m", "rnnreg", "compare", *shared,
                "--strategies", ",".join(self.strategies),
                "--rates", ",".join(map(str, self.rates)), "--jobs", str(self.runs),
                *self.overrides]


# The paper's rows (`rnnreg presets`): Zaremba et al.'s medium and large, Gal & Ghahramani's
# variational medium and large, and the strategy study at the medium size (Zaremba et al.,
# section 4.1; Gal & Ghahramani, section 5) at the medium preset's rate.
PAPER_ROWS = (
    Row("medium", "medium"), Row("large", "large"),
    Row("variational-medium", "variational-medium"),
    Row("variational-large", "variational-large"),
    Row("study-medium", "medium",
        strategies=("none", "zaremba", "variational", "naive", "recurrent_only"), rates=(0.5,)),
)
# The same rows at tiny sizes: some finish, the rest plan far more epochs than their budget
# allows, so both labels are rehearsed.
QUICK_ROWS = (
    Row("medium", "medium", (*TINY, "--epochs", "1")),
    Row("large", "large", (*TINY, "--epochs", "500")),
    Row("variational-medium", "variational-medium", (*TINY, "--epochs", "1")),
    Row("variational-large", "variational-large", (*TINY, "--epochs", "500")),
    Row("study-medium", "medium", (*TINY, "--epochs", "500"),
        strategies=("none", "zaremba"), rates=(0.5,)),
)


# The Triton engine's CUDA tests (in tests/nn/test_cuda.py, and tests/nn/test_cuda_fused.py
# whole): the cuda-triton stage runs these first, the cuda-other stage the rest of ``-m cuda``.
TRITON_TESTS = "triton or graph or capture or fused"


def cuda_test_files() -> list[str]:
    """The test files that mark tests ``cuda``: pytest collects only these (collecting the
    whole suite to select a few dozen tests costs many seconds of a short lease)."""
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                   if "mark.cuda" in path.read_text(encoding="utf-8"))
    return files or ["tests"]


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU check and its CPU rehearsal."""

    device: str
    budget: float                    # seconds for the whole check
    limits: dict[str, float]         # per-stage ceiling before the training rows, seconds
    shapes: str                      # benchmark shapes
    layers_rounds: tuple[int, int]   # layers.py --repeats, --warmup
    test_limit: float                # seconds per test in the pytest stages
    rows: tuple[Row, ...]
    row_limit: float                 # ceiling on each training row, seconds
    row_minimum: float               # rows start only with at least this long left
    top_kernels: int = 12            # the profile's costliest operations per shape
    startup: float = 40.0            # a row's wall time outside its training budget
    # Wall time per second of training budget: each epoch's validation (the split as one
    # stream, batch 1) and its checkpoints come on top of the training steps.
    overhead: float = 1.4
    grace: float = 10.0              # SIGTERM/SIGINT -> SIGKILL: time to save a checkpoint
    train_cap_minutes: float = 0.0   # an upper bound on each training budget (0: none)
    reserve: float = 10.0            # kept back at the end for packing the results


# 300 s: a 15-minute lease less the machine's start (minutes) leaves room for one rerun.
FULL = Profile(
    device="cuda", budget=300.0,
    limits={"wheels": 30, "deps": 20, "install": 45, "machine": 30, "layers": 110,
            "profile": 30, "cuda-triton": 75, "cuda-other": 60},
    shapes="medium,large", layers_rounds=(10, 3), test_limit=40.0,
    rows=PAPER_ROWS, row_limit=420.0, row_minimum=90.0)
QUICK = Profile(
    device="cpu", budget=150.0,
    limits={"wheels": 30, "deps": 20, "install": 60, "machine": 30, "layers": 30,
            "profile": 30, "cuda-triton": 30, "cuda-other": 60},
    shapes="tiny", layers_rounds=(2, 1), test_limit=30.0, top_kernels=5,
    rows=QUICK_ROWS, row_limit=60.0, row_minimum=15.0,
    startup=10.0, overhead=1.2, grace=5.0, reserve=5.0, train_cap_minutes=0.05)


@dataclass
class Stage:
    name: str
    status: str
    seconds: float
    result: str = ""
    began: float | None = None  # seconds after the check started; None: never started


@dataclass
class Running:
    """One stage's process group, held to its limit: SIGTERM at ``deadline``, SIGKILL one
    grace period later (and for anything its leader left behind, one grace after it ended)."""

    stage: Stage
    process: subprocess.Popen
    log: Path
    deadline: float                  # time.monotonic() at which the stop signal goes
    # The stage's result line, from its final status (a training row reads its metrics).
    describe: Callable[[str], str] | None = None
    # SIGINT for pytest, which answers it by writing its reports (JUnit XML) and exiting.
    stop_signal: int = signal.SIGTERM
    signalled: float | None = None   # when SIGTERM went
    killed: bool = False
    interrupted: bool = False
    ended: float | None = None       # when the leader was reaped

    def enforce(self, now: float, grace: float) -> None:
        if self.ended is None and self.process.poll() is not None:
            self.ended = now
        if self.signalled is None and self.ended is None and now >= self.deadline:
            self.signalled = now
            _signal_group(self.process, self.stop_signal)
        start = self.signalled if self.ended is None else max(self.ended, self.signalled or 0)
        if start is not None and now >= start + grace and not self.killed and self.alive():
            self.killed = True
            _signal_group(self.process, signal.SIGKILL)

    def alive(self) -> bool:
        """Whether any process of the group is left (the leader, or workers it started)."""
        return _group_alive(self.process.pid)

    def done(self) -> bool:
        """The leader is reaped and its group empty, or SIGKILLed (a group member that
        init never reaps may linger as a zombie, but it runs nothing)."""
        return self.ended is not None and (self.killed or not self.alive())

    def status(self) -> str:
        code = self.process.returncode
        if self.interrupted:
            return "interrupted"
        if self.signalled is not None:
            return "timed out (killed)" if self.killed else "timed out (stopped)"
        return "ok" if code == 0 else f"failed (exit {code})"


@dataclass
class Check:
    out: Path
    profile: Profile
    quick: bool
    command: str = "bash benchmarks/device_check.sh OUTDIR"
    started: float = field(default_factory=time.monotonic)
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="rnnreg-check-"))
        self.logs = self.work / "logs"
        self.runs = self.work / "runs"
        self.logs.mkdir()
        self.runs.mkdir()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    # benchmarks/: pytest's plugin pytest_limits (the pytest stages)
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(ROOT), str(ROOT / "benchmarks"),
                                    os.environ.get("PYTHONPATH", "")) if p)}
        if self.quick:
            # One intra-op thread: tiny models on a shared CPU run several times faster so.
            # The Python loops: the rehearsal checks the plumbing, and building the compiled CPU
            # loops would cost it half a minute (the CPU suite tests them). On a GPU the own
            # recurrence is the Triton engine, which the default (auto) chooses.
            self.env.update(RNNREG_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                            RNNREG_ENGINE="python")
        self.started_utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.machine: dict = {}
        self.commit = _commit()
        self.row_commands: dict[str, str] = {}
        self.row_results: dict[str, list[tuple[str, RunResult]]] = {}
        self.live: list[Running] = []  # started and not yet finished

    # --- running stages -------------------------------------------------------------------

    def left(self) -> float:
        return self.profile.budget - (time.monotonic() - self.started)

    def stage_limit(self, name: str, limit: float | None = None) -> float:
        """The stage's ceiling, cut to the budget left (less the reserve)."""
        ceiling = self.profile.limits[name] if limit is None else limit
        return min(ceiling, self.left() - self.profile.reserve)

    def run(self, name: str, command: list[str] | Callable[[float], list[str]], *,
            stdout: Path | None = None, limit: float | None = None,
            stop_signal: int = signal.SIGTERM) -> Stage:
        """Run ``command`` under the stage's limit (cut to the time left); log, record, publish.

        stdout goes to ``stdout`` when given (a table), else into the stage's log with stderr.
        ``command`` may be a function of the limit (a pytest stage passes its own limits on).
        """
        ceiling = self.profile.limits[name] if limit is None else limit
        limit = self.stage_limit(name, limit)
        if limit < min(5, ceiling):  # too little left to start anything useful
            return self.record(Stage(name, "skipped", 0.0, "no time left in the budget"))
        if callable(command):
            command = command(limit)
        running = self.start(name, command, limit, stdout=stdout, stop_signal=stop_signal)
        self.supervise([running])
        return running.stage

    def start(self, name: str, command: list[str], limit: float, *,
              stdout: Path | None = None, env: dict | None = None,
              describe: Callable[[str], str] | None = None,
              stop_signal: int = signal.SIGTERM) -> Running:
        """Start ``command`` in a new process group (a new session: Ctrl-C at the terminal
        reaches only this check, which then stops the group itself)."""
        log = self.logs / f"{name}.log"
        began = time.monotonic()
        with open(log, "w") as err, open(stdout or os.devnull, "w") as table:
            err.write(f"$ {shlex.join(command)}\n# limit {limit:.0f} s\n")
            err.flush()
            process = subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})},
                                       stdout=table if stdout else err, stderr=err,
                                       start_new_session=True)
        stage = Stage(name, "running", 0.0, began=began - self.started)
        self.live.append(Running(stage, process, log,
                                 began + max(limit - self.profile.grace, 1), describe,
                                 stop_signal=stop_signal))
        return self.live[-1]

    def supervise(self, running: list[Running]) -> None:
        """Hold every stage to its limit until all have ended; record each as it ends.

        On Ctrl-C or SIGTERM (a KeyboardInterrupt here) every group still running is stopped
        (:meth:`stop_live`) and the interrupt goes on to the caller.
        """
        grace, pending = self.profile.grace, list(running)
        try:
            while True:
                now = time.monotonic()
                for item in pending:
                    item.enforce(now, grace)
                for item in [i for i in pending if i.done()]:
                    pending.remove(item)
                    self._finish(item)
                if not pending:
                    break
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            self.stop_live()
            raise

    def stop_live(self) -> None:
        """Stop every stage started and not finished, each group the same way (SIGTERM,
        SIGKILL after the grace period), and record it as interrupted."""
        live = list(self.live)
        for item in live:
            item.interrupted = True
        _stop_groups(live, self.profile.grace)
        for item in live:
            self._finish(item)

    def _finish(self, item: Running) -> None:
        self.live.remove(item)
        item.process.wait()
        stage = item.stage
        stage.status = item.status()
        stage.seconds = time.monotonic() - self.started - stage.began
        with open(item.log, "a") as err:
            err.write(f"\n# {stage.status} after {stage.seconds:.1f} s\n")
        if item.describe is not None:
            stage.result = item.describe(stage.status)
        self.record(stage)

    def record(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        print(f"[{time.monotonic() - self.started:5.0f} s] {stage.name}: {stage.status} "
              f"({stage.seconds:.1f} s) {stage.result}", flush=True)
        self.publish()
        return stage

    # --- results --------------------------------------------------------------------------

    def publish(self) -> None:
        """(Re)write summary.md, training.md, logs.tar.gz and runs.tar.gz, each atomically."""
        self._write(self.out / "summary.md", self.summary().encode())
        if self.row_results:
            self._write(self.out / "training.md", self.training_table().encode())
        self._write(self.out / "logs.tar.gz", _tar({self.logs: "logs"}))
        runs = {path: path.name for path in sorted(self.runs.iterdir()) if path.is_dir()}
        if runs:
            self._write(self.out / "runs.tar.gz", _tar(runs, skip="checkpoints"))

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(data)
        partial.replace(path)

    def summary(self) -> str:
        mode = "CPU rehearsal (--quick): the numbers mean nothing" if self.quick else "GPU check"
        elapsed = time.monotonic() - self.started
        lines = [f"# rnnreg device check: {mode}", "",
                 f"- command: `{self.command}`",
                 f"- commit: {self.commit}",
                 f"- started: {self.started_utc}; {elapsed:.0f} s of a {self.profile.budget:.0f} s "
                 "budget",
                 f"- machine: {_describe(self.machine)}", "",
                 "| stage | status | start s | seconds | result |", "|---|---|---:|---:|---|"]
        lines += [f"| {s.name} | {s.status} | "
                  f"{'' if s.began is None else f'{s.began:.0f}'} | {s.seconds:.1f} | "
                  f"{s.result} |" for s in self.stages]
        if self.row_results:
            lines += ["", "## training.md", "", self.training_table().strip()]
        for name in ("layers.md", "kernels.md"):
            path = self.out / name
            if path.is_file() and path.stat().st_size:
                lines += ["", f"## {name}", "", path.read_text().strip()]
        return "\n".join(lines) + "\n"

    def training_table(self) -> str:
        """One line per run of the training rows (a study: one per grid run), and the rows'
        commands: the results file to publish beside the summary."""
        processes = sum(row.processes for row in self.profile.rows
                        if row.name in self.row_commands)
        lines = [f"*{len(self.row_commands)} training rows started together on "
                 f"{self.profile.device} ({processes} processes): tokens/s are rates while "
                 "sharing it. PARTIAL: cut by the row's time limit, through the trainer's "
                 "training budget (valid and test scored at the stop) or the check's stop "
                 "(the last epoch's valid, no test).*", "",
                 "| row | run | result | epochs | valid ppl | test ppl | tokens/s |",
                 "|---|---|---|---:|---:|---:|---:|"]
        for row, runs in self.row_results.items():
            lines += [f"| {row} | {name} | {result.label} | {result.epochs} | "
                      f"{_number(result.valid, '.2f')} | {_number(result.test, '.2f')} | "
                      f"{_number(result.tokens_per_s, ',.0f')} |" for name, result in runs]
        lines += ["", "Commands:", ""]
        lines += [f"- {row}: `{command}`" for row, command in self.row_commands.items()]
        return "\n".join(lines) + "\n"

    # --- the stages -----------------------------------------------------------------------

    def install(self) -> None:
        """Wheels from .whl/ if any, a check of the dependencies, then the project itself."""
        probe = ("import importlib.util, sys; missing = [m for m in sys.argv[1:] "
                 "if importlib.util.find_spec(m) is None]; print('missing:', *missing or "
                 "['none']); sys.exit(1 if missing else 0)")
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if wheels:
            site = self.work / "site"
            self.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                "--target", str(site), *map(str, wheels)])
            self.env["PYTHONPATH"] = os.pathsep.join((str(site), self.env["PYTHONPATH"]))
        stage = self.run("deps", [sys.executable, "-c", probe, *DEPENDENCIES])
        stage.result = _last_line(self.logs / "deps.log", "missing:")
        if self.quick:
            # Not into this machine's environment: build the wheel offline, as pip would.
            command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                       "--no-build-isolation", "--no-index", "-w", str(self.work / "wheel"),
                       str(ROOT)]
        else:
            command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                       "--no-build-isolation", "--no-index", "-e", str(ROOT)]
        stage = self.run("install", command)
        stage.result = "PYTHONPATH covers the checkout either way"
        self.publish()

    def check_machine(self) -> bool:
        """torch, CUDA and the device as the stages will see them; rnnreg from this checkout."""
        stage = self.run("machine", [sys.executable, "-c", MACHINE_PROBE, str(ROOT)])
        log = self.logs / "machine.log"
        for line in (log.read_text() if log.is_file() else "").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self.machine = json.loads(line)
        if shutil.which("nvidia-smi") and log.is_file():  # the driver's view, for the log only
            with open(log, "a") as out, contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["nvidia-smi"], stdout=out, stderr=out, timeout=30)
        stage.result = _describe(self.machine)
        if self.profile.device == "cuda" and not self.machine.get("cuda_available"):
            stage.status, stage.result = "failed", "CUDA is not available: nothing to check"
            print(f"machine: {stage.result}", flush=True)
        self.publish()
        return stage.status == "ok"

    def cuda_tests(self) -> None:
        """The Triton engine's CUDA tests, then the other CUDA tests: each test under the
        profile's limit, each stage stopping itself (between tests) before its own limit, and
        SIGINT past it; pytest writes its JUnit XML on every one of these paths."""
        p = self.profile
        for name, selection in (("cuda-triton", TRITON_TESTS),
                                ("cuda-other", f"not ({TRITON_TESTS})")):
            xml = self.out / f"{name}.xml"

            def command(limit: float, xml: Path = xml, selection: str = selection,
                        name: str = name) -> list[str]:
                session = max(limit - p.grace - 5, 1)  # ends itself before the SIGINT
                return [sys.executable, "-m", "pytest", "-m", "cuda", "-k", selection,
                        *cuda_test_files(),
                        "-q", "-rfEsxX", "-p", "no:cacheprovider", "-p", "pytest_limits",
                        f"--limit-per-test={p.test_limit:.0f}",
                        f"--limit-session={session:.0f}", f"--junitxml={xml}",
                        "-o", f"junit_suite_name=rnnreg-{name}"]

            stage = self.run(name, command, stop_signal=signal.SIGINT)
            if stage.status != "skipped":
                stopped = _stopped(self.logs / f"{name}.log")
                if "session limit" in stopped and stage.status == "failed (exit 2)":
                    stage.status = "timed out (session limit)"  # pytest's exit 2: interrupted
                stage.result = _junit(xml) + stopped
            self.publish()

    def benchmarks(self) -> None:
        """The speed tables and the kernel profile, stdout kept whole as each prints it."""
        p = self.profile
        device = ["--device", p.device, "--shapes", p.shapes]
        repeats, warmup = p.layers_rounds
        self.run("layers", [sys.executable, "benchmarks/layers.py", *device, "--tables",
                            "engines", "--repeats", str(repeats), "--warmup", str(warmup),
                            "--markdown"],
                 stdout=self.out / "layers.md")
        self.run("profile", [sys.executable, "benchmarks/launch_bound.py", *device,
                             "--repeats", str(max(repeats // 3, 1)), "--warmup", str(warmup),
                             "--no-whole-graph", "--top", str(p.top_kernels)],
                 stdout=self.out / "kernels.md")
        for stage, table in zip(self.stages[-2:], ("layers.md", "kernels.md")):
            if stage.status != "skipped":
                partial = "" if stage.status == "ok" else "PARTIAL table: "
                stage.result = partial + _headline(stage.name, self.out / table)
        self.publish()

    def training(self, data: Path | None) -> None:
        """Every row at once, each held to its own limit (its ceiling, cut to the budget
        left); a row that fails or overruns ends alone, the others go on."""
        p = self.profile
        if data is None:
            for row in p.rows:
                self.record(Stage(row.name, "skipped", 0.0, "no PTB: see docs/gpu-check.md"))
            return
        left = self.left() - p.reserve
        if left < p.row_minimum:
            for row in p.rows:
                self.record(Stage(row.name, "skipped", 0.0, "no time left in the budget"))
            return
        rows = self._rows_that_fit()
        threads = str(max(1, (os.cpu_count() or 1) // max(1, sum(r.processes for r in rows))))
        running = []
        for row in rows:
            limit = min(row.limit or p.row_limit, left)
            minutes = self._train_minutes(limit)
            out = self.runs / row.name
            command = row.command(data, out, p.device, minutes)
            self.row_commands[row.name] = self._shown(command)
            running.append(self.start(
                row.name, command, limit, env={"OMP_NUM_THREADS": threads},
                describe=lambda status, row=row, out=out, minutes=minutes:
                    self._row_result(row, out, minutes, status)))
        self.supervise(running)

    def _shown(self, command: list[str]) -> str:
        """A row's command as someone would type it again: `python3`, and paths relative to
        the checkout and to the check's own scratch folder (where `runs/` is tarred from)."""
        text = shlex.join(["python3", *command[1:]])
        return text.replace(f"{self.work}/", "").replace(f"{ROOT}/", "")

    def _train_minutes(self, limit: float) -> float:
        """The trainer's budget inside a row's limit: it counts training steps only, so the
        startup, the final scoring and the grace period come off, and the per-epoch
        validation and checkpoints in proportion."""
        p = self.profile
        minutes = (limit - p.startup - p.grace) / p.overhead / 60
        if p.train_cap_minutes:
            minutes = min(minutes, p.train_cap_minutes)
        return max(minutes, MIN_TRAIN_MINUTES)

    def _rows_that_fit(self) -> list[Row]:
        """The rows that get a CPU core per process on a GPU (a training process drives its
        kernels from one core; sharing cores would slow every row); the rest are skipped.
        The CPU rehearsal shares its cores anyway, so all its rows run."""
        rows, cores, used = [], os.cpu_count() or 1, 0
        for row in self.profile.rows:
            if self.profile.device == "cuda" and used + row.processes > cores:
                self.record(Stage(row.name, "skipped", 0.0, f"needs {row.processes} more "
                                  f"processes than the {cores} CPU cores have room for"))
                continue
            rows.append(row)
            used += row.processes
        return rows

    def _row_result(self, row: Row, out: Path, minutes: float, status: str) -> str:
        """The row's line in the stage table; its runs go into training.md."""
        runs = ([(path.name, path) for path in sorted((out / "runs").glob("*"))]
                if row.strategies else [("", out)])
        stopped = status.startswith(("timed out", "interrupted"))
        results = [(name, _run_result(path, minutes, stopped)) for name, path in runs]
        self.row_results[row.name] = results
        if not row.strategies:
            return results[0][1].line()
        return _study_line(results, row.runs)


# --- helpers ----------------------------------------------------------------------------------


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the stage's whole process group (it may have ended in between)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member that is not ours: still there
        return True
    return True


def _stop_groups(running: list[Running], grace: float) -> None:
    """SIGTERM every group at once, SIGKILL whatever is left after one grace period."""
    for item in running:
        _signal_group(item.process, item.stop_signal)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(item.alive() for item in running):
        for item in running:
            item.process.poll()  # reap leaders, so that an empty group reads as gone
        time.sleep(POLL_SECONDS)
    for item in running:
        if item.alive():
            item.killed = True
            _signal_group(item.process, signal.SIGKILL)


def _tar(sources: dict[Path, str], skip: str | None = None) -> bytes:
    """A tar.gz of ``sources`` (path: name in the archive) without any folder named ``skip``."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if skip in info.name.split("/")[1:] else info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in sources.items():
            tar.add(path, arcname=name, filter=keep)
    return buffer.getvalue()


def _commit() -> str:
    if os.environ.get("RNNREG_COMMIT"):
        return os.environ["RNNREG_COMMIT"] + " (from RNNREG_COMMIT)"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "rnnreg", "benchmarks",
                                "tests"], cwd=ROOT, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here; pass RNNREG_COMMIT=<sha> to record it)"
    return head + ("-dirty" if dirty else "")


def _describe(machine: dict) -> str:
    if not machine:
        return "unknown"
    device = machine.get("device") or "no CUDA device"
    extra = f", capability {machine['capability']}, {machine['memory_gib']} GiB" \
        if "capability" in machine else ""
    cpus = f", {machine['cpus']} CPU cores" if machine.get("cpus") else ""
    return (f"{device}{extra}{cpus}; torch {machine['torch']} (CUDA {machine['torch_cuda']}, "
            f"cuDNN {machine['cudnn']}), Python {machine['python']}")


def _last_line(log: Path, prefix: str) -> str:
    if not log.is_file():
        return ""
    lines = [line for line in log.read_text().splitlines() if line.startswith(prefix)]
    return lines[-1] if lines else ""


def _junit(xml: Path) -> str:
    if not xml.is_file():
        return "no JUnit file written"
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as error:
        return f"unreadable JUnit file ({error})"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    xfail = sum(1 for case in suite.iter("testcase") for s in case.findall("skipped")
                if s.get("type") == "pytest.xfail")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return (f"{counts['tests']} tests: {passed} passed, {counts['failures']} failed, "
            f"{counts['errors']} errors, {counts['skipped'] - xfail} skipped, {xfail} xfailed "
            f"({xml.name})")


def _rows(table: Path) -> list[dict[str, str]]:
    """The body rows of the first Markdown table in ``table`` whose first column is ``shape``
    (a file may hold several: the precision settings, the kernel profile), keyed by its
    header cells."""
    if not table.is_file():
        return []
    blocks, block = [], []
    for line in table.read_text().splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            blocks.append(block)
            block = []
    for cells in blocks:
        if cells[0][0] == "shape":
            header, body = cells[0], [r for r in cells[1:] if not set(r[0]) <= set("-: ")]
            return [dict(zip(header, row)) for row in body]
    return []


def _stopped(log: Path) -> str:
    """What cut a pytest stage short, from its log (benchmarks/pytest_limits.py's line, or
    pytest's own on SIGINT)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip(" !=") for line in text.splitlines()]
    limit = [line for line in lines if "limits: session limit" in line]
    if limit:
        return f"; stopped: {limit[-1].split('Interrupted: ', 1)[-1]}"
    if "KeyboardInterrupt" in text:
        return "; stopped by SIGINT at the stage's limit"
    return ""


def _headline(name: str, table: Path) -> str:
    """The numbers of a benchmark table that the short summary shows (the tables themselves
    follow the summary whole, every column as the benchmark printed it)."""
    rows = _rows(table)
    if not rows:
        return "no table (see logs/)"
    if name == "layers" and "row" in rows[0]:  # the GPU engines table
        parts = []
        for r in rows:
            if r["row"].startswith("nn.LSTM"):
                continue
            measured = r.get("vs nn.LSTM(dropout)", "-")
            if measured == "-":
                measured = r.get("ms/iter", "?").split(":")[0]  # not available, failed
            parts.append(f"{r['shape']} {r['precision']} {r['strategy']} {r['row']} "
                         f"{measured} (predicted {r.get('PREDICTED ms/iter', '-')} ms, "
                         f"measured {r.get('ms/iter', '-')} ms)")
        return "vs nn.LSTM(dropout): " + "; ".join(parts)
    if name == "layers" and "default loop engine" in rows[0]:  # the CPU engines table
        return "vs nn.LSTM(dropout): " + "; ".join(
            f"{r['shape']} {r['dtype']} {r['default loop engine']} "
            f"{r.get('default engine vs nn.LSTM(dropout)', '?')}, Python loop "
            f"{r.get('Python loop vs nn.LSTM(dropout)', '?')}" for r in rows)
    if name == "layers":  # rnnreg / nn.LSTM(dropout), and the engine that ran each strategy
        return "; ".join(
            f"{strategy} vs nn.LSTM(dropout): " + ", ".join(
                f"{r['shape']} {r.get('vs nn.LSTM(dropout)', '?')}"
                + (f" ({r['engine']})" if r.get("engine") else "") for r in rows
                if r.get("strategy") == strategy)
            for strategy in ("zaremba", "variational"))
    if name == "profile":  # ms/iter of cuDNN and the own loop; its costliest kernel
        parts = []
        for shape in dict.fromkeys(r["shape"] for r in rows if "model" in r):
            kinds = {("own" if "own" in r["model"] else "cudnn"): r for r in rows
                     if r.get("shape") == shape and "model" in r}
            own, cudnn = kinds.get("own", {}), kinds.get("cudnn", {})
            parts.append(f"{shape} ms/iter cuDNN {cudnn.get('ms/iter', '?')}, own loop "
                         f"{own.get('ms/iter', '?')} ({own.get('ops/step/layer', '?')} ops/step/"
                         f"layer, busy {own.get('busy', '?')})")
        return "; ".join(parts) + " (kernel times: kernels.md)"
    return "no headline for this table"


@dataclass(frozen=True)
class RunResult:
    """How far one run got, from its metrics.jsonl and config.json."""

    label: str                       # "complete", "PARTIAL", "unfinished" or "no metrics"
    why: str = ""                    # what cut a PARTIAL run, or left it unfinished
    epochs: str = ""                 # "2.40 of 39"
    valid: float | None = None       # the final score, else the last epoch's
    test: float | None = None
    tokens_per_s: float | None = None

    def line(self) -> str:
        if self.label == "no metrics":
            return "no metrics written (see logs/)"
        why = f" ({self.why})" if self.why else ""
        scores = (f"valid {_number(self.valid, '.2f')}, "
                  + ("no test score" if self.test is None else f"test {self.test:.2f}"))
        return (f"{self.label}{why}: {self.epochs} epochs, {scores}, "
                f"{_number(self.tokens_per_s, ',.0f')} tok/s")


def _run_result(out: Path, minutes: float, stopped: bool = False) -> RunResult:
    """complete / PARTIAL, epochs done, last valid/test perplexity and tokens/s of a run.

    A run stopped by its training budget writes a final record (both splits scored at the
    stop); one the check ``stopped`` (SIGTERM at the row's limit) saves a checkpoint and
    writes none, so its last valid score is its last epoch's and it has no test score. A run
    with no final record that was not stopped (it crashed or diverged) is unfinished.
    """
    path = out / "metrics.jsonl"
    if not path.is_file():
        return RunResult("no metrics")
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
            records.append(json.loads(line))
    epochs = [r for r in records if r.get("event") == "epoch"]
    steps = [r for r in records if r.get("event") == "step"]
    final = next((r for r in records if r.get("event") == "final"), None)
    planned = "?"
    with contextlib.suppress(OSError, ValueError, KeyError):
        planned = json.loads((out / "config.json").read_text())["config"]["epochs"]
    rates = [r["tokens_per_s"] for r in records if r.get("event") in ("epoch", "step")
             and r.get("tokens_per_s") is not None]
    speed = rates[-1] if rates else None  # the latest: an epoch's mean, or a step record's
    done = max([float(len(epochs))] + [s.get("epochs_done", 0.0) for s in steps])
    if final is not None and final.get("complete"):
        return RunResult("complete", "", f"{final['epochs_completed']} of {planned}",
                         final["valid_ppl"], final.get("test_ppl"), speed)
    label, why = "PARTIAL", f"training budget {_minutes(minutes)} min"
    valid, test = (final["valid_ppl"], final.get("test_ppl")) if final else (
        epochs[-1]["valid_ppl"] if epochs else None, None)
    if final is None:
        label, why = ("PARTIAL", "stopped at the row's time limit") if stopped else (
            "unfinished", "no final record: see logs/")
    return RunResult(label, why, f"{done:.2f} of {planned}", valid, test, speed)


def _study_line(results: list[tuple[str, RunResult]], planned: int) -> str:
    """A study row's line: how many of its runs ended how, and the lowest valid score."""
    labels = [result.label for _, result in results]
    counts = ", ".join(f"{labels.count(label)} {label}" for label in dict.fromkeys(labels))
    scored = [(result.valid, name) for name, result in results if result.valid is not None]
    best = f"; lowest valid {min(scored)[0]:.2f} ({min(scored)[1]})" if scored else ""
    return f"{len(results)} of {planned} runs started: {counts or 'none'}{best} (training.md)"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _minutes(minutes: float) -> str:
    """A training budget as `--max-train-minutes` takes it: two decimals, never 0.00."""
    return f"{max(minutes, MIN_TRAIN_MINUTES):.2f}"


PHRASES = ("the cat sat on the mat", "the dog ran to the park", "a bird flew over the tree",
           "my friend ate a red apple", "the cat ate the fish", "a dog sat under the tree")


def write_tiny_corpus(directory: Path) -> Path:
    """train/valid/test of random short phrases: learnable in seconds (as the tests' corpus)."""
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = "".join(rng.choice(PHRASES) + "\n" for _ in range(lines))
        (directory / f"{split}.txt").write_text(text, encoding="utf-8")
    return directory


def find_ptb() -> Path | None:
    """$RNNREG_DATA, else data/ptb in the checkout; None unless all three PTB files are there.
    (Their MD5 sums are checked when rnnreg loads them.)"""
    directory = Path(os.environ.get("RNNREG_DATA") or ROOT / "data" / "ptb")
    return directory if all((directory / f).is_file() for f in PTB_FILES) else None


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C or SIGTERM: the running stages are stopped and the results written. Later
    signals are ignored so that the clean-up itself is not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="where the (at most 8) result files go")
    parser.add_argument("--quick", action="store_true",
                        help="CPU rehearsal with tiny shapes and a tiny corpus")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check (default: {FULL.budget:.0f}, "
                             f"--quick {QUICK.budget:.0f})")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.budget is not None:
        if args.budget <= 0:
            parser.error("--budget must be > 0")
        profile = replace(profile, budget=args.budget)
    args.outdir.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else list(argv)
    check = Check(args.outdir.resolve(), profile, args.quick,
                  command=shlex.join(["bash", "benchmarks/device_check.sh", *given]))
    signal.signal(signal.SIGTERM, _interrupt_once)
    signal.signal(signal.SIGINT, _interrupt_once)
    interrupted = False
    try:
        check.install()
        if check.check_machine():
            check.benchmarks()
            check.cuda_tests()
            data = write_tiny_corpus(check.work / "corpus") if args.quick else find_ptb()
            check.training(data)
    except KeyboardInterrupt:
        interrupted = True
        check.stop_live()  # any started outside supervise(), a moment before the signal
        print("\ninterrupted: the stages still running were stopped", flush=True)
    finally:
        check.publish()
        print("\n" + "\n".join(check.summary().split("\n## ")[0].splitlines()[2:]))
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [s for s in check.stages
              if s.status.startswith(("failed", "timed out", "interrupted"))]
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
