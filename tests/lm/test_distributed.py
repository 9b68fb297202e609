"""Data-parallel training on CPU (gloo): equal to one process, stopped and killed jobs resume.

The jobs run as real separate processes through the command line: once through ``torchrun``
itself, otherwise started the way torchrun starts them (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), so a test can make one rank misbehave.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rnnreg import cli
from rnnreg.lm.distributed import World, detect
from rnnreg.lm.rundir.checkpoint import load_tree
from rnnreg.lm.rundir.layout import RunDir
from support import REPO_ROOT, SCRIPT_PATH, write_corpus

# 400 tokens in 4 streams: 20 windows of 5 per epoch, about a second of training per job.
FLAGS = ["--preset", "small", "--hidden-size", "16", "--batch-size", "4", "--bptt", "5",
         "--epochs", "2", "--train-tokens", "400", "--init-range", "0.3", "--eval-bptt", "50",
         "--checkpoint-minutes", "0", "--seed", "3", "--device", "cpu", "--no-progress"]
DROPOUT = ["--strategy", "zaremba", "--dropout", "0.3", "--checkpoint-steps", "3"]
JOB_TIMEOUT = 120

# One rank of a job, started by hand: after ``stop_after`` optimizer steps it asks itself to
# stop (SIGTERM, as torchrun forwards it), after ``kill_after`` it is killed (SIGKILL).
RANK_SCRIPT = textwrap.dedent("""
    import signal, sys

    import torch

    torch.set_num_threads(1)
    from support.steps import AfterStep, signal_self

    AfterStep(int(sys.argv[1]), signal_self(signal.SIGTERM))
    AfterStep(int(sys.argv[2]), signal_self(signal.SIGKILL))
    from rnnreg.cli import main

    sys.exit(main(sys.argv[3:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    # One thread per rank: the machine is shared, and results must not depend on the count.
    env = {**os.environ, "PYTHONPATH": SCRIPT_PATH, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def _launch(argv: list[str], *, world: int = 2, stop_after: dict[int, int] | None = None,
            kill_after: int = 0) -> list[subprocess.CompletedProcess]:
    """Run ``rnnreg ARGV`` as ``world`` ranks; ``stop_after`` maps a rank to its stop step."""
    port = str(_free_port())
    ranks = []
    for rank in range(world):
        env = {**_environment(), "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        stop = (stop_after or {}).get(rank, 0)
        ranks.append(subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(stop), str(kill_after), *argv],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for process in ranks:
            out, err = process.communicate(timeout=JOB_TIMEOUT)
            results.append(subprocess.CompletedProcess(process.args, process.returncode,
                                                       out, err))
    finally:
        for process in ranks:  # a failed test must not leave a rank waiting for its peer
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tree(out / "checkpoints" / "last.safetensors")["model"]


def _epochs(out: Path) -> list[dict]:
    return [r for r in RunDir(out).read_metrics() if r.get("event") == "epoch"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted two-process run with dropout on."""
    out = tmp_path_factory.mktemp("jobs") / "reference"
    ranks = _launch(["train", "--data-dir", str(corpus), "--out", str(out), *FLAGS, *DROPOUT])
    assert all(r.returncode == 0 for r in ranks), [r.stderr for r in ranks]
    return out


# --------------------------------------------------------------------------- environment


def test_the_launch_environment_is_read(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert detect() == World()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect() == World(3, 4, 1, distributed=True)
    assert detect().device(torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4 and WORLD_SIZE=4"):
        detect()
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="torchrun"):
        detect()


def test_a_single_process_world_changes_nothing():
    world = World()
    state = (torch.randn(2, 4, 3), torch.randn(2, 4, 3))
    assert world.sum(1.5, 2) == [1.5, 2] and world.max(0.1, True) == [0.1, True]
    assert world.gather_columns(state) is state
    assert all(torch.equal(a, b) for a, b in zip(world.shard_columns(state), state))
    assert world.gather_objects("rng") == ["rng"]
    assert world.from_main(lambda: 7) == 7 and world.everywhere(lambda: 8) == 8


# --------------------------------------------------------------------------- equal to one process


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(corpus, tmp_path):
    """Through torchrun itself, dropout off: the masks are the one thing ranks draw apart."""
    single, double = tmp_path / "single", tmp_path / "double"
    assert cli.main(["train", "--data-dir", str(corpus), "--out", str(single), *FLAGS]) == 0
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rnnreg", "train", "--data-dir", str(corpus), "--out", str(double), *FLAGS],
        cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True,
        timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.stderr
    assert job.stdout.count('"event": "final"') == 1  # only rank 0 prints the summary
    one, two = _epochs(single), _epochs(double)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [20, 40]
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    for key in ("train_ppl", "valid_ppl"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    expected = _weights(single)
    for name, tensor in _weights(double).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- stop, kill, resume


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks(reference):
    rng = load_tree(reference / "checkpoints" / "last.safetensors")["rng"]
    assert len(rng) == 2  # one RNG state per rank, and each rank draws its own masks
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert rng[0]["python"] == rng[1]["python"]  # window lengths are drawn alike


@pytest.mark.slow
def test_stopped_then_killed_job_resumes_to_the_uninterrupted_weights(reference, corpus,
                                                                      tmp_path):
    argv = ["train", "--data-dir", str(corpus), *FLAGS, *DROPOUT]
    job = tmp_path / "job"
    # SIGTERM reaches rank 1 only, after step 4: both ranks stop there and save.
    stopped = _launch([*argv, "--out", str(job)], stop_after={1: 4})
    assert [r.returncode for r in stopped] == [130, 130], [r.stderr for r in stopped]
    assert load_tree(job / "checkpoints" / "last.safetensors")["progress"]["step"] == 4

    # Resumed, checkpointed at step 6, then both ranks killed after step 8.
    resume = ["train", "--resume", "--out", str(job), "--data-dir", str(corpus), "--no-progress"]
    killed = _launch(resume, kill_after=4)
    assert all(r.returncode != 0 for r in killed)
    progress = load_tree(job / "checkpoints" / "last.safetensors")["progress"]
    assert (progress["step"], progress["epoch"]) == (6, 1)

    finished = _launch(resume)
    assert all(r.returncode == 0 for r in finished), [r.stderr for r in finished]
    expected = _weights(reference)
    for name, tensor in _weights(job).items():
        assert torch.equal(tensor, expected[name]), name
    for key in ("train_ppl", "valid_ppl", "step"):
        assert [r[key] for r in _epochs(job)] == [r[key] for r in _epochs(reference)], key


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(reference, corpus, capsys):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    code = cli.main(["train", "--resume", "--out", str(reference), "--data-dir", str(corpus)])
    assert code == 2
    assert "checkpointed by 2 process(es)" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == {p: data for p, data in before.items() if p.name != ".lock"}


@pytest.mark.slow
def test_a_batch_that_does_not_divide_is_refused_on_every_rank(corpus, tmp_path):
    ranks = _launch(["train", "--data-dir", str(corpus), "--out", str(tmp_path / "run"),
                     *FLAGS, "--batch-size", "5"])
    for rank in ranks:
        assert rank.returncode == 2
        assert "batch size 5 is not divisible by world size 2" in rank.stderr
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything is written


# --------------------------------------------------------------------------- one writer per run


SLOW_TRAIN = textwrap.dedent("""
    import sys, time

    import torch

    torch.set_num_threads(1)
    original_step = torch.optim.SGD.step

    def slow_step(self, *args, **kwargs):  # keeps the run alive while the test looks at it
        time.sleep(0.5)
        return original_step(self, *args, **kwargs)

    torch.optim.SGD.step = slow_step
    from rnnreg.cli import main

    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_writers_lock_recovered(corpus, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    argv = ["train", "--data-dir", str(corpus), "--out", str(out), *FLAGS, "--epochs", "1"]
    writer = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *argv], cwd=REPO_ROOT,
                              env=_environment(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / "config.json").is_file(), writer)
        for second in (argv, ["train", "--resume", "--out", str(out), "--data-dir",
                              str(corpus)]):
            assert cli.main(second) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("rnnreg: error: "), lines
            assert f"in use by pid {writer.pid} " in lines[0]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert cli.main(["train", "--resume", "--out", str(out), "--data-dir", str(corpus)]) == 0
    assert [r["epoch"] for r in _epochs(out)] == [1]
    assert RunDir(out).read_config().epochs == 1


def _wait_for(condition, process: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the first writer ended early"
        assert time.monotonic() < deadline, "the first writer never started"
        time.sleep(0.1)
