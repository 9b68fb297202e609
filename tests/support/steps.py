"""Act after the n-th optimizer step of a process: how tests stop, kill or fault a run at a
chosen point.

The trainer's ``on_step`` hook serves tests that call ``train`` themselves; a run started
through the CLI, or in a subprocess, is reached through ``torch.optim.SGD.step`` instead. One
helper for both, so that every such test counts steps the same way (after the step is taken,
over the whole process). Subprocess scripts import it with ``tests/`` on ``PYTHONPATH``
(:data:`support.SCRIPT_PATH`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch

from support import REPO_ROOT, SCRIPT_PATH


class AfterStep:
    """Call ``action`` once optimizer step ``at`` has been taken; ``taken`` counts the steps.

    ``patch`` installs the wrapped step: ``monkeypatch.setattr`` in a test (undone after it, or
    at the end of a ``monkeypatch.context()``), plain ``setattr`` in a subprocess.
    """

    def __init__(self, at: int, action: Callable[[], None], patch=setattr) -> None:
        self.taken, original = 0, torch.optim.SGD.step

        def step(optimizer, *args, **kwargs):
            result = original(optimizer, *args, **kwargs)
            self.taken += 1
            if self.taken == at:
                action()
            return result

        patch(torch.optim.SGD, "step", step)


def signal_self(signum: int) -> Callable[[], None]:
    """An action that sends ``signum`` to this process (SIGINT: Ctrl-C; SIGKILL: kill -9)."""
    return lambda: os.kill(os.getpid(), signum)


_KILLED_TRAIN = textwrap.dedent("""
    import json, signal, sys

    import torch

    torch.set_num_threads(int(sys.argv[5]))
    from rnnreg.lm.config import Config
    from rnnreg.lm.training.loop import train
    from support.steps import AfterStep, signal_self

    AfterStep(int(sys.argv[4]), signal_self(signal.SIGKILL))
    train(Config.from_dict(json.loads(sys.argv[1])), sys.argv[2], data_dir=sys.argv[3],
          progress=False, verbose=False)
""")


def train_killed(config, out: Path, data_dir: Path, at: int, threads: int) -> None:
    """``rnnreg.train(config, out)`` in a subprocess, killed (SIGKILL) after step ``at``:
    what a resume must recover from exactly."""
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAIN, json.dumps(config.to_dict()), str(out),
         str(data_dir), str(at), str(threads)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": SCRIPT_PATH}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
