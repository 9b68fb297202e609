"""Provenance: which code on which machine produced a run, recorded in its ``config.json``."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

from rnnreg.lm.rundir.files import StrPath

__all__ = ["describe_machine", "git_commit", "package_commit"]


def describe_machine() -> dict[str, Any]:
    """The facts about this machine that explain a run's speed and numerics, for run metadata."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
    }


def _git(args: list[str], cwd: StrPath | None) -> str | None:
    """Output of a git command, or None if git is missing, fails or hangs."""
    # Optional locks off: `git status` would otherwise refresh the index and could collide with
    # a git command the user is running at the same moment.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(cwd: StrPath | None = None) -> str | None:
    """The checked-out commit, with "-dirty" if tracked files have uncommitted changes.

    Untracked files do not count (as with `git describe --dirty`): run outputs and scratch files
    would otherwise mark nearly every run dirty. None outside a git repository or without git.
    """
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return f"{commit}-dirty" if status else commit


def package_commit() -> str | None:
    """The commit of the rnnreg checkout being run, wherever the command runs from.

    Looked up beside the package, not in the current directory: a run started from a job's
    scratch directory still records the code that trained it (None for an installed wheel).
    """
    return git_commit(Path(__file__).resolve().parent)
