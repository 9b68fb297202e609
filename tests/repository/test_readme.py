"""The README's and docs' examples are part of the contract: they must run, or parse, as written.

Python blocks are executed; every ``rnnreg`` command line in a shell block is parsed by the CLI's
own parser (nothing is trained), so a renamed flag or command fails here before a reader meets it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from rnnreg.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.DOTALL)


def _command_lines(block: str) -> list[list[str]]:
    """The argument lists after ``rnnreg`` (or ``-m rnnreg``) on each line of a shell block."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "rnnreg" and (i == 0 or words[i - 1] == "-m" or "=" in words[i - 1]):
                commands.append(words[i + 1:])
                break
    return commands


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_has_a_layers_example():
    assert any("rnnreg.LSTM" in block for block in _blocks(PAGES[0], "python"))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_examples_run(page: Path):
    torch.manual_seed(0)
    for block in _blocks(page, "python"):
        namespace: dict = {}
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own docs
        if "out" in namespace and "reference" in namespace:
            # The example's claim: weights load into torch.nn.LSTM and give the same eval output.
            namespace["var"].eval()
            ours, _ = namespace["var"](namespace["x"])
            theirs, _ = namespace["reference"](namespace["x"])
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_shell_commands_parse(page: Path):
    parser = _parser()
    for block in _blocks(page, "bash"):
        for args in _command_lines(block):
            try:
                parser.parse_args(args)
            except SystemExit as error:  # argparse's way of refusing
                pytest.fail(f"{_page_id(page)}: `rnnreg {shlex.join(args)}` does not parse "
                            f"(exit {error.code})")


def test_readme_commands_are_seen():
    """The parse check above sees the README's train and test commands (not vacuously empty)."""
    seen = [args[0] for block in _blocks(PAGES[0], "bash") for args in _command_lines(block)]
    assert "train" in seen


def test_the_readme_gives_the_first_command_the_time_of_the_committed_run():
    """The CPU time next to the first command is results/ptb-small's training time."""
    text = " ".join(PAGES[0].read_text().split())
    said = re.search(r"It takes (\d+) minutes of training on a shared 2-core CPU "
                     r"\(\[results/ptb-small\]\(results/ptb-small\)\)", text)
    assert said is not None
    lines = (ROOT / "results" / "ptb-small" / "metrics.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["event"] == "final" and final["complete"] is True
    assert int(said.group(1)) == round(final["train_seconds"] / 60)
