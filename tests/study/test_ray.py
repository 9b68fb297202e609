"""The Ray Tune backend of the strategy study: the same runs and report as the local backend.

The sweep itself needs the optional extra (``pip install 'rnnreg[ray]'``); it is marked
``ray`` so it can be deselected, and skipped where Ray is not installed. The tests of what
happens without Ray run everywhere.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.study import grid as study
from rnnreg.study.grid import StudyGrid, ray_backend, run_study
from rnnreg.study.report import write_report
from support import REPO_ROOT

BASE = Config(hidden_size=8, bptt=5, batch_size=4, epochs=1, eval_bptt=50,
              checkpoint_minutes=0.0, device="cpu")
GRID = StudyGrid(strategies=("none", "zaremba"), rates=(0.5,), cells=("lstm",), seeds=(1,))
RUNS = ["lstm-none-p0-s1", "lstm-zaremba-p0.5-s1"]


@pytest.mark.slow
def test_importing_rnnreg_does_not_import_ray():
    code = ("import sys, rnnreg, rnnreg.cli, rnnreg.study.grid, rnnreg.lm.training.loop, "
            "rnnreg.lm.distributed; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0


def test_without_ray_the_backend_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if missing
    with pytest.raises(ImportError, match=r"pip install 'rnnreg\[ray\]'"):
        ray_backend()
    code = cli.main(["compare", "--backend", "ray", "--out", str(tmp_path / "study"),
                     "--strategies", "none", "--no-progress"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'rnnreg[ray]'" in lines[0]
    assert not (tmp_path / "study").exists()


def test_an_address_without_the_ray_backend_is_refused(tmp_path, capsys):
    code = cli.main(["compare", "--address", "auto", "--out", str(tmp_path / "study")])
    assert code == 2
    assert "--backend ray" in capsys.readouterr().err


def _report_structure(out: Path) -> dict:
    """What the report says, without the numbers that differ from one training to another."""
    markdown = (out / "report.md").read_text()
    return {
        "headings": [line for line in markdown.splitlines() if line.startswith("#")],
        "rows": [line.split(" | ")[:3] for line in markdown.splitlines()
                 if line.startswith("| lstm |")],
        "figures": sorted(p.name for p in (out / "figures").iterdir()),
        "runs": sorted(p.name for p in (out / "runs").iterdir()),
    }


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'rnnreg[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_sweep_gives_the_local_backends_report(local_ray, module_corpus, tmp_path,
                                                      monkeypatch):
    swept, local = tmp_path / "ray", tmp_path / "local"
    backend = ray_backend(storage=tmp_path / "tune", progress=False)
    run_study(BASE, GRID, swept, data_dir=module_corpus, progress=False, backend=backend)
    run_study(BASE, GRID, local, data_dir=module_corpus, progress=False)
    for out in (swept, local):
        write_report(out)
    assert _report_structure(swept) == _report_structure(local)
    assert _report_structure(swept)["runs"] == RUNS
    for name in RUNS:
        assert any(r.get("event") == "final" for r in RunDir(swept / "runs" / name).read_metrics())

    # Resumed: every run has finished, so nothing reaches Ray (nor trains in this process).
    monkeypatch.setattr(study, "train", _forbidden)
    before = {name: (swept / "runs" / name / "metrics.jsonl").read_bytes() for name in RUNS}
    run_study(BASE, GRID, swept, data_dir=module_corpus, progress=False, backend=backend)
    assert before == {name: (swept / "runs" / name / "metrics.jsonl").read_bytes()
                      for name in RUNS}


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing should be trained")
