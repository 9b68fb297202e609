"""The README's examples are part of the contract: they must run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_a_layers_example():
    assert any("rnnreg.LSTM" in block for block in _python_blocks())


def test_readme_python_examples_run():
    torch.manual_seed(0)
    for block in _python_blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        if "out" in namespace and "reference" in namespace:
            # The example's claim: weights load into torch.nn.LSTM and give the same eval output.
            namespace["var"].eval()
            ours, _ = namespace["var"](namespace["x"])
            theirs, _ = namespace["reference"](namespace["x"])
            torch.testing.assert_close(ours, theirs)
