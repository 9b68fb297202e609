"""Faults on the way to disk: a full disk, a file size limit, a read-only directory, a writer
that fails mid-file, and a kill during a checkpoint write.

The faults are injected without root and without a special filesystem:

- a file size limit (``RLIMIT_FSIZE`` in a subprocess, SIGXFSZ ignored) makes every write past it
  fail with EFBIG the way a full disk fails with ENOSPC, part of the data already in;
- a read-only directory is a ``chmod``-ed one. These tests also run as root, and root ignores
  permission bits; where they are ignored, the OS calls that create or open files for writing
  under the directory are patched instead to fail with EROFS, as they do on a read-only mount;
- a writer that fails mid-file is the real one patched to write part of its output, then raise.

For each: the CLI's one-line error naming the file and the cause, the previous checkpoint intact
and loadable, and once the fault is gone, a resume that ends with the weights of an uninterrupted
run and a history (metrics and TensorBoard) that holds every event once.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rnnreg.cli as cli
from rnnreg.cli.flags import flag
from rnnreg.lm.config import Config
from rnnreg.lm.presets import preset_config
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.curves import save as save_figure
from rnnreg.lm.rundir.events import ScalarLog
from rnnreg.lm.rundir.files import WriteError, atomic_write_text
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.lm.training.loop import train
from support import REPO_ROOT, SCRIPT_PATH, TEST_THREADS
from support.steps import AfterStep

FLAGS = {"hidden_size": 16, "batch_size": 10, "bptt": 10, "epochs": 2, "init_range": 0.3,
         "eval_bptt": 50, "checkpoint_minutes": 0.0, "checkpoint_steps": 0, "seed": 7,
         "device": "cpu", "strategy": "zaremba", "strategy_p": 0.3}
CONFIG = preset_config("small").replace(**FLAGS)
STEPS_PER_EPOCH = 21  # 2040 tokens in 10 streams: 203 targets a stream, windows of 10
FAULT_AT = STEPS_PER_EPOCH + 1  # the fault starts in epoch 2: epoch 1's checkpoint is good


def _train_args(out: Path, data: Path, **changes) -> list[str]:
    flags = {**FLAGS, **changes}
    return ["train", "--preset", "small", "--out", str(out), "--data-dir", str(data),
            "--no-progress", *(f"{flag(k)}={v}" for k, v in flags.items())]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("rnnreg: error: cannot write ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_corpus) -> Path:
    """The uninterrupted run every faulted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(CONFIG, out, data_dir=module_corpus, progress=False, verbose=False)
    return out


def _weights(out: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_tree(out / "checkpoints" / f"{name}.safetensors")["model"]


def _assert_same_weights(out: Path, reference: Path, name: str = "last") -> None:
    actual, expected = _weights(out, name), _weights(reference, name)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def _scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reading of the run's curves (purges applied)."""
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _assert_history_like(out: Path, reference: Path) -> None:
    """Every metrics event once, with the reference's numbers; the same for TensorBoard."""
    records = RunDir(out).read_metrics()
    expected = RunDir(reference).read_metrics()
    assert [(r["event"], r.get("epoch")) for r in records] == [
        (r["event"], r.get("epoch")) for r in expected] == [
        ("epoch", 1), ("epoch", 2), ("final", None)]
    for record, twin in zip(records, expected):
        for key in ("step", "lr", "train_ppl", "valid_ppl", "test_ppl"):
            assert record.get(key) == twin.get(key), key
    curves, twins = _scalars(out), _scalars(reference)
    assert curves.keys() == twins.keys()
    for tag, points in curves.items():
        assert [step for step, _ in points] == [step for step, _ in twins[tag]], tag
        if tag in ("train_ppl", "valid_ppl", "test_ppl"):
            # The values alone: pytest.approx compares flat sequences of numbers, not pairs.
            values = [value for _, value in points]
            assert values == pytest.approx([value for _, value in twins[tag]]), tag


def _assert_good_checkpoint(out: Path, step: int) -> None:
    """`last` is the checkpoint of `step`, loads, and nothing half-written lies beside it."""
    assert load_tree(out / "checkpoints" / "last.safetensors")["progress"]["step"] == step
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names in (["last.safetensors"], ["best.safetensors", "last.safetensors"]), names


def _resume(capsys, out: Path, data: Path) -> str:
    code, stdout, err = _cli(capsys, "train", "--resume", "--out", str(out), "--data-dir",
                             str(data), "--no-progress")
    assert code == 0, err
    return stdout


def _permission_bits_bind() -> bool:
    """Whether a directory without write permission refuses new files to this process.

    Root (precisely: CAP_DAC_OVERRIDE) ignores permission bits, so this is tried, not assumed.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "locked"
        directory.mkdir(mode=0o500)
        try:
            (directory / "probe").touch()
        except PermissionError:
            return True
        finally:
            directory.chmod(0o700)
        return False


PERMISSION_BITS_BIND = _permission_bits_bind()


class _ReadOnly:
    """Make `directory` (and everything under it) unwritable while switched on.

    By permission bits where they bind. Root ignores them, so there the calls that create or
    open a file for writing (and mkdir, link) fail with EROFS for paths under the directory, as
    they do on a read-only mount.
    """

    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, directory: Path, monkeypatch) -> None:
        self.directory, self.on = directory.resolve(), False
        self._modes: dict[Path, int] = {}
        if not PERMISSION_BITS_BIND:
            self._patch(monkeypatch)

    def _inside(self, path) -> bool:
        if not self.on or isinstance(path, int):
            return False
        path = Path(os.fsdecode(path)).resolve()
        return path == self.directory or self.directory in path.parents

    def _refuse(self, path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def _patch(self, monkeypatch) -> None:
        os_open, os_mkdir, os_link, io_open = os.open, os.mkdir, os.link, builtins.open

        def opening(path, flags, *args, **kwargs):
            if flags & self._WRITE and self._inside(path):
                self._refuse(path)
            return os_open(path, flags, *args, **kwargs)

        def making(path, *args, **kwargs):
            if self._inside(path) and not os.path.exists(path):  # EEXIST comes first
                self._refuse(path)
            return os_mkdir(path, *args, **kwargs)

        def linking(source, target, *args, **kwargs):
            if self._inside(target):
                self._refuse(target)
            return os_link(source, target, *args, **kwargs)

        def open_file(file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+") and self._inside(file):
                self._refuse(file)
            return io_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", opening)
        monkeypatch.setattr(os, "mkdir", making)
        monkeypatch.setattr(os, "link", linking)
        monkeypatch.setattr(builtins, "open", open_file)

    def switch_on(self) -> None:
        self.on = True
        if PERMISSION_BITS_BIND:
            for path in [self.directory, *self.directory.rglob("*")]:
                self._modes[path] = stat.S_IMODE(path.stat().st_mode)
                path.chmod(self._modes[path] & ~0o222)

    def switch_off(self) -> None:
        self.on = False
        for path, mode in self._modes.items():
            path.chmod(mode)
        self._modes.clear()


# --------------------------------------------------------------------------- the typed error


def _half_written_save(tensors, filename, metadata=None):
    """safetensors' writer running out of space halfway, with the error it raises then."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[:len(data) // 2])
    raise safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_checkpoint_write_failing_mid_file_is_a_typed_error_and_leaves_the_old_one(
        tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    run.save_checkpoint("last", {"step": 1, "w": torch.ones(3)})
    monkeypatch.setattr(safetensors.torch, "save_file", _half_written_save)
    with pytest.raises(WriteError, match=r"last\.safetensors: disk full") as raised:
        run.save_checkpoint("last", {"step": 2, "w": torch.zeros(3)})
    assert raised.value.errno == errno.ENOSPC and raised.value.path == run.checkpoint_path("last")
    copy = pickle.loads(pickle.dumps(raised.value))  # as it crosses processes (Ray, torchrun)
    assert (type(copy), str(copy), copy.errno) == (WriteError, str(raised.value), errno.ENOSPC)
    old = run.load_checkpoint("last")
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in run.checkpoint_dir.iterdir()] == ["last.safetensors"]


def test_a_failed_append_is_cut_back(tmp_path, monkeypatch):
    """The record reaches the file, then forcing it to disk fails (ENOSPC, as NFS reports a
    full disk): the file must not keep the record it could not make durable."""
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    run.append_metrics({"event": "epoch", "epoch": 1})
    before = run.metrics_path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=r"metrics\.jsonl: disk full"):
        run.append_metrics({"event": "epoch", "epoch": 2})
    monkeypatch.undo()
    assert run.metrics_path.read_bytes() == before


LIMITED_WRITES = textwrap.dedent("""
    import resource, signal, sys
    from rnnreg.lm.rundir.files import WriteError, atomic_write_text
    from rnnreg.lm.rundir.layout import RunDir

    run = RunDir(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))
    for write in (lambda: run.append_metrics({"event": "epoch", "note": "x" * 200}),
                  lambda: atomic_write_text(run.config_path, "y" * 300)):
        try:
            write()
        except WriteError as error:
            print(error.errno, error)
""")


@pytest.mark.slow  # a subprocess
def test_writes_past_a_file_size_limit_leave_each_file_as_it_was(tmp_path):
    run = RunDir(tmp_path / "run").create(exist_ok=False)
    run.append_metrics({"event": "epoch", "epoch": 1})
    atomic_write_text(run.config_path, "{}\n")
    metrics = run.metrics_path.read_bytes()
    limit = len(metrics) + 100  # the next record gets partly in before the limit stops it
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITES, str(run.path), str(limit)], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"{errno.EFBIG} cannot write {run.metrics_path}: file size limit")
    assert lines[1].startswith(f"{errno.EFBIG} cannot write {run.config_path}: file size limit")
    assert run.metrics_path.read_bytes() == metrics
    assert run.config_path.read_text() == "{}\n"
    assert sorted(p.name for p in run.path.iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "tensorboard"]


def test_a_figure_write_failing_mid_file_leaves_the_previous_figure(tmp_path, monkeypatch):
    path = tmp_path / "plots" / "curve.png"
    figure = Figure()
    figure.add_subplot().plot([1, 2, 3])
    save_figure(figure, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    savefig = Figure.savefig

    def full(self, fname, **kwargs):
        savefig(self, fname, **kwargs)
        with open(fname, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(WriteError, match=r"curve\.png: disk full"):
        save_figure(figure, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_a_figure_into_a_read_only_directory_is_a_one_line_error(tmp_path, reference, capsys,
                                                                   monkeypatch):
    figures = tmp_path / "figures"
    figures.mkdir()
    blocked = _ReadOnly(figures, monkeypatch)
    blocked.switch_on()
    code, _, err = _cli(capsys, "plot", str(reference), "--out", str(figures / "curves.png"))
    blocked.switch_off()
    _assert_one_line_error(code, err, "curves.png",
                           "permission" if PERMISSION_BITS_BIND else "read-only")
    assert not list(figures.iterdir())


def test_files_follow_the_umask(tmp_path):
    """New files get 0666 minus the umask, checkpoints included (safetensors alone makes them
    0600)."""
    previous = os.umask(0o027)
    try:
        run = RunDir(tmp_path / "run").create(exist_ok=False)
        run.save_checkpoint("last", {"w": torch.ones(2)})
        run.copy_checkpoint("last", "best")
        run.write_config(Config())
        run.append_metrics({"event": "epoch"})
        ScalarLog(run.tensorboard_dir).add_scalar("x", 1.0, 1)
    finally:
        os.umask(previous)
    files = [run.checkpoint_path("last"), run.checkpoint_path("best"), run.config_path,
             run.metrics_path, *run.tensorboard_dir.iterdir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}


def test_tensorboard_purge_step_drops_what_the_resumed_run_logs_again(tmp_path):
    first = ScalarLog(tmp_path)
    for epoch, value in ((1, 10.0), (2, 9.0), (3, 8.0)):
        first.add_scalar("valid_ppl", value, epoch)
    resumed = ScalarLog(tmp_path, purge_step=2)  # resumed from the checkpoint of epoch 1
    for epoch, value in ((2, 7.0), (3, 6.0)):
        resumed.add_scalar("valid_ppl", value, epoch)
    assert first.path != resumed.path and sorted(tmp_path.iterdir())[-1] == resumed.path
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("valid_ppl")] == [
        (1, 10.0), (2, 7.0), (3, 6.0)]


# --------------------------------------------------------------------------- faults in training


LIMITED_RUN = textwrap.dedent("""
    import resource, signal, sys

    import torch

    torch.set_num_threads(int(sys.argv[1]))
    from rnnreg.cli import main

    from support.steps import AfterStep

    fault_at, limit = int(sys.argv[2]), int(sys.argv[3])

    def limit_files():  # from here on no file may grow past `limit` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    AfterStep(fault_at, limit_files)
    sys.exit(main(sys.argv[4:]))
""")


@pytest.mark.slow  # a subprocess
def test_a_full_disk_at_the_end_of_an_epoch(tmp_path, module_corpus, reference, capsys):
    """The issue's case: the epoch's record is written, its checkpoint is not. The error says
    so in one line; the resume drops the record and trains the epoch again."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_RUN, str(TEST_THREADS), str(FAULT_AT), "4096",
         *_train_args(out, module_corpus)], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": SCRIPT_PATH}, capture_output=True, text=True,
        timeout=300)
    _assert_one_line_error(result.returncode, result.stderr, "last.safetensors",
                           "file size limit", f"last checkpoint (step {STEPS_PER_EPOCH}) is "
                           "intact", "--resume")
    _assert_good_checkpoint(out, STEPS_PER_EPOCH)
    assert [r["epoch"] for r in RunDir(out).read_metrics()] == [1, 2]

    stdout = _resume(capsys, out, module_corpus)
    assert f"resuming at step {STEPS_PER_EPOCH} (epoch 2): dropped 1 metrics event" in stdout
    _assert_same_weights(out, reference)
    _assert_same_weights(out, reference, "best")
    _assert_history_like(out, reference)


@pytest.mark.parametrize("fault", ["read-only", "writer fails mid-file"])
def test_a_fault_during_training(fault, tmp_path, module_corpus, reference, capsys,
                                 monkeypatch):
    out = tmp_path / "run"
    if fault == "read-only":
        blocked = _ReadOnly(out, monkeypatch)
        AfterStep(FAULT_AT, blocked.switch_on, monkeypatch.setattr)
        file, cause = "metrics.jsonl", ("permission" if PERMISSION_BITS_BIND else "read-only")
    else:
        faulty = {"on": False}
        save_file = safetensors.torch.save_file

        def save(tensors, filename, metadata=None):
            writer = _half_written_save if faulty["on"] else save_file
            return writer(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save)
        AfterStep(FAULT_AT, lambda: faulty.update(on=True), monkeypatch.setattr)
        file, cause = "last.safetensors", "disk full"
    code, _, err = _cli(capsys, *_train_args(out, module_corpus))
    _assert_one_line_error(code, err, file, cause, f"(step {STEPS_PER_EPOCH}) is intact")
    if fault == "read-only":
        blocked.switch_off()
    monkeypatch.undo()
    _assert_good_checkpoint(out, STEPS_PER_EPOCH)

    _resume(capsys, out, module_corpus)
    _assert_same_weights(out, reference)
    _assert_history_like(out, reference)


def test_an_unwritable_out_is_refused_before_training(tmp_path, module_corpus, capsys,
                                                      monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    blocked = _ReadOnly(out, monkeypatch)
    blocked.switch_on()
    trained = AfterStep(1, lambda: None, monkeypatch.setattr)
    code, _, err = _cli(capsys, *_train_args(out, module_corpus))
    blocked.switch_off()
    _assert_one_line_error(code, err, str(out), "or choose another --out")
    assert trained.taken == 0 and not list(out.iterdir())


def test_resume_into_a_read_only_run_is_refused_before_training(tmp_path, module_corpus,
                                                                 capsys, monkeypatch):
    out = tmp_path / "run"
    train(CONFIG.replace(epochs=1), out, data_dir=module_corpus, progress=False, verbose=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    blocked = _ReadOnly(out, monkeypatch)
    blocked.switch_on()
    trained = AfterStep(1, lambda: None, monkeypatch.setattr)
    code, _, err = _cli(capsys, "train", "--resume", "--out", str(out), "--data-dir",
                        str(module_corpus), "--no-progress")
    blocked.switch_off()
    _assert_one_line_error(code, err, str(out))
    assert trained.taken == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_best_is_written_after_last_as_a_link_to_it(tmp_path, module_corpus):
    linked = []

    def at_step(step: int) -> None:
        if step == FAULT_AT:  # epoch 1 ended (it improved: there was no best before it)
            checkpoints = tmp_path / "run" / "checkpoints"
            linked.append(os.path.samefile(checkpoints / "best.safetensors",
                                           checkpoints / "last.safetensors"))

    train(CONFIG, tmp_path / "run", data_dir=module_corpus, progress=False, verbose=False,
          on_step=at_step)
    assert linked == [True]


def test_resume_without_a_checkpoint_starts_over_on_a_cleared_history(
        tmp_path, module_corpus, reference, capsys):
    out = tmp_path / "run"
    train(CONFIG, out, data_dir=module_corpus, progress=False, verbose=False)
    (out / "checkpoints" / "last.safetensors").unlink()  # lost, as on the full disk
    stdout = _resume(capsys, out, module_corpus)
    assert "no checkpoint to resume: training from the start" in stdout
    assert "cleared 3 metrics event(s), the TensorBoard curves, the best checkpoint" in stdout
    _assert_same_weights(out, reference)
    _assert_same_weights(out, reference, "best")
    _assert_history_like(out, reference)


# --------------------------------------------------------------------------- kill -9


KILLED_WRITE = textwrap.dedent("""
    import json, os, signal, sys

    import safetensors.torch
    import torch

    torch.set_num_threads(int(sys.argv[1]))
    from rnnreg.cli.flags import flag
    from rnnreg.lm.config import Config
    from rnnreg.lm.rundir.layout import RunDir
    from rnnreg.lm.training.loop import train

    where, kill_at = sys.argv[2], int(sys.argv[3])
    save_file, saves = safetensors.torch.save_file, 0

    def save(tensors, filename, metadata=None):
        global saves
        saves += 1
        if where == "inside the write of last" and saves == kill_at:
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        save_file(tensors, filename, metadata=metadata)

    def copy(self, source, name):
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save
    if where == "between last and best":
        RunDir.copy_checkpoint = copy
    config = Config.from_dict(json.loads(sys.argv[4]))
    train(config, sys.argv[5], data_dir=sys.argv[6], progress=False, verbose=False)
""")


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("where", ["inside the write of last", "between last and best"])
def test_kill_during_a_checkpoint_write(where, tmp_path, module_corpus, reference):
    """A checkpoint every step, and a SIGKILL inside one of them: in the middle of writing
    `last` (step 8), or at the end of epoch 1 with `last` written and `best` not yet."""
    config = CONFIG.replace(checkpoint_steps=1)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(TEST_THREADS), where, "8",
         json.dumps(config.to_dict()), str(out), str(module_corpus)], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    checkpoints = out / "checkpoints"
    if where == "inside the write of last":
        assert load_tree(checkpoints / "last.safetensors")["progress"]["step"] == 7
        assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # half-written
    else:
        assert load_tree(checkpoints / "last.safetensors")["progress"]["step"] == STEPS_PER_EPOCH
        assert not (checkpoints / "best.safetensors").exists()

    train(config, out, data_dir=module_corpus, resume=True, progress=False, verbose=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.safetensors",
                                                             "last.safetensors"]
    _assert_same_weights(out, reference)
    _assert_same_weights(out, reference, "best")
    _assert_history_like(out, reference)


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path, module_corpus):
    out = tmp_path / "run"
    train(CONFIG.replace(epochs=1), out, data_dir=module_corpus, progress=False, verbose=False)
    before = _scalars(out)
    train(CONFIG.replace(epochs=1), out, data_dir=module_corpus, resume=True, progress=False,
          verbose=False)
    assert _scalars(out) == before and len(before["test_ppl"]) == 1
    assert [r["event"] for r in RunDir(out).read_metrics()] == ["epoch", "final"]
