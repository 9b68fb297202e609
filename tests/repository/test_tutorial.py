"""docs/tutorial.ipynb: stored with its outputs, and it still runs from top to bottom.

The slow test executes a copy with nbclient in a fresh kernel that imports this checkout's
rnnreg, so a change to the library that breaks the notebook fails the suite; the checks read the
outputs the cells print (the layer against its own equations and against torch.nn.LSTM, the
comparison's table), not only the absence of errors.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from support import REPO_ROOT

NOTEBOOK = REPO_ROOT / "docs" / "tutorial.ipynb"
# The comparison's rows, in the order of rnnreg.STRATEGIES as the study groups them.
ROWS = ("none", "zaremba p=0.5", "variational p=0.5", "naive p=0.5")
# A row of the comparison's table: a label, then train, valid and test as "mean ± std".
ROW = re.compile(r"^(\S+(?: p=\S+)?)\s+" + r"\s+".join([r"(\d+\.\d) ± (\d+\.\d)"] * 3) + r"$")


def _text(notebook) -> str:
    """Everything the code cells printed, in order."""
    return "".join(output.get("text", "") for cell in notebook.cells
                   if cell.cell_type == "code" for output in cell.outputs)


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line.strip())
        if match:
            rows[match.group(1)] = [float(value) for value in match.groups()[1:]]
    return rows


def _checks(text: str) -> None:
    assert "layer == the equations: True" in text
    assert "evaluation: equal to torch.nn.LSTM with the same weights? True" in text
    assert "training: two calls give the same output? False" in text
    assert "one per sequence, recurrent mask: (1, 1, 1, 20)" in text
    rows = _table(text)
    assert list(rows) == list(ROWS)
    for values in rows.values():
        assert all(math.isfinite(value) for value in values)
        assert all(value >= 1 for value in values[0::2])  # a perplexity is at least 1


def test_the_stored_notebook_carries_its_outputs_and_no_machine_path():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Executed top to bottom in one kernel, as GitHub shows it.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [output for cell in code for output in cell.outputs
                if output.output_type == "error"]
    images = [output for cell in code for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) >= 8  # masks, heatmaps, five placement diagrams, learning curves
    _checks(_text(notebook))
    stored = NOTEBOOK.read_text(encoding="utf-8")
    assert str(REPO_ROOT) not in stored and "/tmp/" not in stored


def test_the_notebook_links_to_files_that_exist():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    text = "".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    links = re.findall(r"\]\(([^)#]+\.md)\)", text)
    assert {"study.md", "layers.md", "../results/strategy-study/report.md"} <= set(links)
    for link in links:
        assert (NOTEBOOK.parent / link).is_file(), link


@pytest.mark.slow
def test_the_notebook_runs_from_top_to_bottom(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel inherits the environment: this checkout's rnnreg, one thread (the runs are
    # tiny), and its temporary runs under tmp_path.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), path])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    _checks(_text(notebook))
    assert any(p.name.startswith("rnnreg-tutorial-") for p in Path(tmp_path).iterdir())
