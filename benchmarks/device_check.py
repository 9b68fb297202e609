"""One prepared GPU check: CUDA tests, speed against cuDNN and the paper's medium model.

    bash benchmarks/device_check.sh OUTDIR            # on a machine with a GPU (README: GPU check)
    bash benchmarks/device_check.sh OUTDIR --quick    # CPU rehearsal: same stages, tiny sizes

GPU time comes in short leases, so everything runs in one call that stops itself before its
budget (default 530 s, inside the 9 minutes of one device command): each stage is a subprocess
with its own time limit, cut to what is left, and is stopped (SIGTERM, then SIGKILL) when it
overruns, so a slow stage cannot eat the call. Stages, in order of what matters most:

1. deps, install: the project without downloading another torch (``pip install --no-deps
   --no-build-isolation --no-index -e .``; wheels in ``.whl/`` for any missing small
   dependency; PYTHONPATH in any case);
2. machine: torch, CUDA and the device as the stages see them, and rnnreg imported from this
   checkout (without CUDA the GPU check stops here);
3. cuda-tests: ``pytest -m cuda tests`` (tests/test_cuda.py and every other test marked
   ``cuda``) with JUnit XML;
4. layers, launch-bound, train-speed: benchmarks/layers.py, launch_bound.py and train.py at the
   paper's small, medium and large shapes, rnnreg and cuDNN side by side in one process;
5. medium, then variational-medium: ``rnnreg train`` on PTB with a training-time budget
   (``--max-train-minutes``) fitted to the time left; a run cut short is labelled partial.

OUTDIR receives at most 8 files, all at its top level, rewritten after every stage so that a
call killed from outside still returns what was done: ``summary.md`` (stages, status, times,
headline numbers and every table), ``cuda-tests.xml``, ``layers.md``, ``launch-bound.md``,
``train-speed.md``, ``logs.tar.gz`` (every stage's full log) and ``runs.tar.gz`` (the run
directories without checkpoints). The summary is printed last.

``--quick`` runs the same stages on the CPU with tiny shapes and a tiny corpus it writes
itself (the CUDA tests run on the CPU through ``RNNREG_CHECK_DEVICE=cpu``), so the plumbing is
tested on machines without a GPU; its numbers mean nothing.

PTB is read from ``$RNNREG_DATA``, else ``data/ptb`` in the checkout (an ignored folder that the
device call carries). Only the standard library is imported here: a broken torch or rnnreg
shows up as a failed stage, not as a crashed check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
# Imported by rnnreg, its tests or benchmarks and not part of torch; torch itself is the
# machine's and is never installed here.
DEPENDENCIES = ("numpy", "safetensors", "tqdm", "matplotlib", "tensorboard", "filelock", "pytest",
                "hypothesis")
MACHINE_PROBE = """
import json, platform, sys, rnnreg, torch
if not rnnreg.__file__.startswith(sys.argv[1]):
    sys.exit(f"rnnreg resolves to {rnnreg.__file__}, not to the checkout {sys.argv[1]}")
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "rnnreg": rnnreg.__file__}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info))
"""


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU check and its CPU rehearsal."""

    device: str
    budget: float                    # seconds for the whole check
    limits: dict[str, float]         # per-stage ceiling, seconds
    shapes: str                      # benchmark shapes
    layers_rounds: tuple[int, int]   # layers.py --repeats, --warmup
    train_speed: tuple[int, int]     # train.py --windows, --repeats
    train_overrides: tuple[str, ...] = ()   # extra `rnnreg train` flags
    variational_overrides: tuple[str, ...] = ()
    startup: float = 30.0            # a training run's wall time outside its training budget
    # Wall time per second of training budget: each epoch's validation (the split as one
    # stream, batch 1) and its two checkpoints come on top of the training steps.
    overhead: float = 1.4
    grace: float = 15.0              # SIGTERM -> SIGKILL: time to save a checkpoint
    train_cap_minutes: float = 0.0   # an upper bound on each training budget (0: none)
    reserve: float = 15.0            # kept back at the end for packing the results


FULL = Profile(
    device="cuda", budget=530.0,
    limits={"wheels": 60, "deps": 30, "install": 90, "machine": 60, "cuda-tests": 150,
            "layers": 120, "launch-bound": 60, "train-speed": 150, "medium": 600,
            "variational-medium": 600},
    shapes="small,medium,large", layers_rounds=(10, 3), train_speed=(60, 2))
QUICK = Profile(
    device="cpu", budget=170.0,
    limits={"wheels": 30, "deps": 20, "install": 60, "machine": 30, "cuda-tests": 60,
            "layers": 30, "launch-bound": 30, "train-speed": 40, "medium": 40,
            "variational-medium": 30},
    shapes="tiny", layers_rounds=(2, 1), train_speed=(5, 1),
    train_overrides=("--hidden-size", "16", "--batch-size", "4", "--bptt", "5", "--epochs",
                     "2", "--eval-bptt", "50"),
    # Far more epochs than the budget allows, so the partial label is rehearsed too.
    variational_overrides=("--hidden-size", "16", "--batch-size", "4", "--bptt", "5",
                           "--epochs", "500", "--eval-bptt", "50"),
    startup=8.0, overhead=1.2, grace=5.0, reserve=5.0, train_cap_minutes=0.05)


@dataclass
class Stage:
    name: str
    status: str
    seconds: float
    result: str = ""


@dataclass
class Check:
    out: Path
    profile: Profile
    quick: bool
    started: float = field(default_factory=time.monotonic)
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="rnnreg-check-"))
        self.logs = self.work / "logs"
        self.runs = self.work / "runs"
        self.logs.mkdir()
        self.runs.mkdir()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    # The compiled CPU loops are for CPUs (the CPU suite tests them); building
                    # them would cost a minute of the lease for nothing the GPU measures.
                    "RNNREG_NATIVE": "0",
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        if self.quick:
            # One intra-op thread: tiny models on a shared CPU run several times faster so.
            self.env.update(RNNREG_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.started_utc = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.machine: dict = {}
        self.commit = _commit()

    # --- running stages -------------------------------------------------------------------

    def left(self) -> float:
        return self.profile.budget - (time.monotonic() - self.started)

    def run(self, name: str, command: list[str], *, stdout: Path | None = None,
            limit: float | None = None) -> Stage:
        """Run ``command`` under the stage's limit (cut to the time left); log, record, publish.

        stdout goes to ``stdout`` when given (a table), else into the stage's log with stderr.
        """
        ceiling = self.profile.limits[name] if limit is None else limit
        limit = min(ceiling, self.left() - self.profile.reserve)
        if limit < min(5, ceiling):  # too little left to start anything useful
            return self.record(Stage(name, "skipped", 0.0, "no time left in the budget"))
        log = self.logs / f"{name}.log"
        began = time.monotonic()
        with open(log, "w") as err, open(stdout or os.devnull, "w") as table:
            err.write(f"$ {' '.join(command)}\n# limit {limit:.0f} s\n")
            err.flush()
            process = subprocess.Popen(command, cwd=ROOT, env=self.env,
                                       stdout=table if stdout else err, stderr=err,
                                       start_new_session=True)
            status = self._wait(process, limit)
        seconds = time.monotonic() - began
        with open(log, "a") as err:
            err.write(f"\n# {status} after {seconds:.1f} s\n")
        return self.record(Stage(name, status, seconds))

    def _wait(self, process: subprocess.Popen, limit: float) -> str:
        """Wait up to ``limit``; past it, SIGTERM (a training run saves and stops at the next
        window), then SIGKILL after the grace period. The whole process group goes."""
        try:
            code = process.wait(timeout=max(limit - self.profile.grace, 1))
            return "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=self.profile.grace)
            return "timed out (stopped)"
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
            return "timed out (killed)"

    def record(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        print(f"[{time.monotonic() - self.started:5.0f} s] {stage.name}: {stage.status} "
              f"({stage.seconds:.1f} s) {stage.result}", flush=True)
        self.publish()
        return stage

    # --- results --------------------------------------------------------------------------

    def publish(self) -> None:
        """(Re)write summary.md, logs.tar.gz and runs.tar.gz in OUTDIR, each atomically."""
        self._write(self.out / "summary.md", self.summary().encode())
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
                 f"- command: `bash benchmarks/device_check.sh OUTDIR"
                 f"{' --quick' if self.quick else ''}`",
                 f"- commit: {self.commit}",
                 f"- started: {self.started_utc}; {elapsed:.0f} s of a {self.profile.budget:.0f} s "
                 "budget",
                 f"- machine: {_describe(self.machine)}", "",
                 "| stage | status | seconds | result |", "|---|---|---:|---|"]
        lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.result} |"
                  for s in self.stages]
        for name in ("layers.md", "launch-bound.md", "train-speed.md"):
            path = self.out / name
            if path.is_file() and path.stat().st_size:
                lines += ["", f"## {name}", "", path.read_text().strip()]
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
        for line in (self.logs / "machine.log").read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self.machine = json.loads(line)
        if shutil.which("nvidia-smi"):  # the driver's view, for the log only
            with open(self.logs / "machine.log", "a") as log, contextlib.suppress(
                    OSError, subprocess.SubprocessError):
                subprocess.run(["nvidia-smi"], stdout=log, stderr=log, timeout=30)
        stage.result = _describe(self.machine)
        if self.profile.device == "cuda" and not self.machine.get("cuda_available"):
            stage.status, stage.result = "failed", "CUDA is not available: nothing to check"
            print(f"machine: {stage.result}", flush=True)
        self.publish()
        return stage.status == "ok"

    def cuda_tests(self) -> None:
        xml = self.out / "cuda-tests.xml"
        stage = self.run("cuda-tests", [
            sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q",
            "-rfEsxX", "-p", "no:cacheprovider", f"--junitxml={xml}",
            "-o", "junit_suite_name=rnnreg-cuda"])
        stage.result = _junit(xml)
        self.publish()

    def benchmarks(self) -> None:
        p = self.profile
        device = ["--device", p.device, "--shapes", p.shapes]
        repeats, warmup = p.layers_rounds
        self.run("layers", [sys.executable, "benchmarks/layers.py", *device, "--repeats",
                            str(repeats), "--warmup", str(warmup), "--markdown"],
                 stdout=self.out / "layers.md")
        self.run("launch-bound", [sys.executable, "benchmarks/launch_bound.py", *device,
                                  "--repeats", str(repeats), "--warmup", str(warmup)],
                 stdout=self.out / "launch-bound.md")
        windows, rounds = p.train_speed
        self.run("train-speed", [sys.executable, "benchmarks/train.py", *device, "--windows",
                                 str(windows), "--repeats", str(rounds)],
                 stdout=self.out / "train-speed.md")
        for stage in self.stages[-3:]:
            if stage.status != "skipped":
                stage.result = _headline(stage.name, self.out / f"{stage.name}.md")
        self.publish()

    def training(self, data: Path | None) -> None:
        if data is None:
            for name in ("medium", "variational-medium"):
                self.record(Stage(name, "skipped", 0.0, "no PTB: see README, GPU check"))
            return
        medium = self.train("medium", data, self.profile.train_overrides)
        if medium.status == "ok" and medium.result.startswith("complete"):
            self.train("variational-medium", data, self.profile.variational_overrides)
        else:
            self.record(Stage("variational-medium", "skipped", 0.0,
                              "runs only after a complete medium run"))

    def train(self, preset: str, data: Path, overrides: tuple[str, ...]) -> Stage:
        p = self.profile
        limit = min(p.limits[preset], self.left() - p.reserve)
        # The budget counts training steps only; startup and the final scoring come on top,
        # the per-epoch validation and checkpoints in proportion, and the grace period too.
        minutes = (limit - p.startup - p.grace) / p.overhead / 60
        if minutes * 60 < 3:
            return self.record(Stage(preset, "skipped", 0.0, "no time left in the budget"))
        if p.train_cap_minutes:
            minutes = min(minutes, p.train_cap_minutes)
        out = self.runs / preset
        stage = self.run(preset, [
            sys.executable, "-m", "rnnreg", "train", "--preset", preset, "--data-dir", str(data),
            "--out", str(out), "--device", p.device, "--no-progress", "--checkpoint-minutes",
            "0", "--max-train-minutes", f"{minutes:.2f}", *overrides], limit=limit)
        stage.result = _run_result(out, minutes)
        self.publish()
        return stage


# --- helpers ----------------------------------------------------------------------------------


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal the stage's whole process group (it may have ended in between)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


def _tar(sources: dict[Path, str], skip: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in sources.items():
            # A member named RUN/skip (and so everything under it) is left out.
            tar.add(path, arcname=name,
                    filter=lambda info: None if info.name.split("/")[1:2] == [skip] else info)
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
    return (f"{device}{extra}; torch {machine['torch']} (CUDA {machine['torch_cuda']}, cuDNN "
            f"{machine['cudnn']}), Python {machine['python']}")


def _last_line(log: Path, prefix: str) -> str:
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
            "(cuda-tests.xml)")


def _rows(table: Path) -> list[dict[str, str]]:
    """The body rows of the Markdown table in ``table``, keyed by its header cells."""
    if not table.is_file():
        return []
    cells = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in table.read_text().splitlines() if line.startswith("|")]
    if not cells:
        return []
    header, body = cells[0], [r for r in cells[1:] if not set(r[0]) <= set("-: ")]
    return [dict(zip(header, row)) for row in body]


def _headline(name: str, table: Path) -> str:
    """The numbers of a benchmark table that the short summary shows."""
    rows = _rows(table)
    if not rows:
        return "no table (see logs/)"
    if name == "layers":  # rnnreg / nn.LSTM(dropout) on the fused path and the own loop
        return "; ".join(
            f"{strategy} vs nn.LSTM(dropout): " + ", ".join(
                f"{r['shape']} {r.get('vs nn.LSTM(dropout)', '?')}" for r in rows
                if r.get("strategy") == strategy)
            for strategy in ("zaremba", "variational"))
    if name == "launch-bound":  # ms/iter of cuDNN, the own loop, the own loop in CUDA graphs
        parts = []
        for shape in dict.fromkeys(r["shape"] for r in rows):
            kinds = {("graph" if "graph" in r["model"] else "own" if "own" in r["model"]
                      else "cudnn"): r for r in rows if r["shape"] == shape}
            own, cudnn = kinds.get("own", {}), kinds.get("cudnn", {})
            text = (f"{shape} ms/iter cuDNN {cudnn.get('ms/iter', '?')}, own loop "
                    f"{own.get('ms/iter', '?')} ({own.get('ops/step/layer', '?')} ops/step/"
                    f"layer, busy {own.get('busy', '?')})")
            if "graph" in kinds:
                text += f", own loop in CUDA graphs {kinds['graph'].get('ms/iter', '?')}"
            parts.append(text)
        return "; ".join(parts)
    return "trainer / plain loop: " + ", ".join(
        f"{r['shape'].split()[0]} {r.get('ratio', '?')}" for r in rows)


def _run_result(out: Path, minutes: float) -> str:
    """complete / partial, epochs, perplexities and speed, from the run's metrics.jsonl."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return "no metrics written (see logs/)"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    final = next((r for r in records if r.get("event") == "final"), None)
    config = json.loads((out / "config.json").read_text())["config"]
    planned = config["epochs"]
    speed = f"{epochs[-1]['tokens_per_s']:,.0f} tok/s" if epochs else "no epoch finished"
    if final is None:
        done = epochs[-1]["epoch"] if epochs else 0
        best = f", best valid {min(r['valid_ppl'] for r in epochs):.2f}" if epochs else ""
        return f"partial: stopped by the stage limit after {done} of {planned} epochs{best}; " \
               f"no test score; {speed}"
    label = "complete" if final["complete"] else (
        f"partial (training budget {minutes:.2f} min)")
    return (f"{label}: {final['epochs_completed']} of {planned} epochs, valid "
            f"{final['valid_ppl']:.2f}, test {final['test_ppl']:.2f}, "
            f"{final['train_seconds']:.0f} s training; {speed}")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="where the (at most 8) result files go")
    parser.add_argument("--quick", action="store_true",
                        help="CPU rehearsal with tiny shapes and a tiny corpus")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default: 530, --quick 170)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.budget is not None:
        if args.budget <= 0:
            parser.error("--budget must be > 0")
        profile = Profile(**{**profile.__dict__, "budget": args.budget})
    args.outdir.mkdir(parents=True, exist_ok=True)
    check = Check(args.outdir.resolve(), profile, args.quick)
    try:
        check.install()
        if check.check_machine():
            check.cuda_tests()
            check.benchmarks()
            data = write_tiny_corpus(check.work / "corpus") if args.quick else find_ptb()
            check.training(data)
    finally:
        check.publish()
        print("\n" + "\n".join(check.summary().split("\n## ")[0].splitlines()[2:]))
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [s for s in check.stages if s.status.startswith(("failed", "timed out"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
