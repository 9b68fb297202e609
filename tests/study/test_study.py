"""The dropout-strategy study: the grid, resuming, parallel runs, the report and `compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from rnnreg import cli
from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.evaluation import load_model
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.study import grid as study
from rnnreg.study.grid import StudyGrid, grid_runs, run_study
from rnnreg.study.report import write_report
from support import assert_strict_json

# Tiny and fast, but every flag goes through the CLI the way a user would pass it.
TINY_FLAGS = ["--epochs", "1", "--hidden-size", "8", "--bptt", "5", "--batch-size", "4",
              "--eval-bptt", "50", "--valid-batch-size", "1", "--checkpoint-minutes", "0",
              "--device", "cpu", "--no-progress"]
RUNS = ("lstm-none-p0-s1", "lstm-none-p0-s2", "lstm-variational-p0.5-s1",
        "lstm-variational-p0.5-s2")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, module_corpus) -> Path:
    """One real study, trained once per module: none and variational at p=0.5, two seeds."""
    out = tmp_path_factory.mktemp("study") / "study"
    code = cli.main(["compare", "--strategies", "none,variational", "--rates", "0.5",
                     "--cells", "lstm", "--seeds", "1,2", "--data-dir", str(module_corpus),
                     "--out", str(out), *TINY_FLAGS])
    assert code == 0
    return out


@pytest.fixture
def study_copy(finished_study, tmp_path) -> Path:
    """A private copy of the finished study, for tests that damage or extend it."""
    return Path(shutil.copytree(finished_study, tmp_path / "study"))


def _base(study_dir: Path) -> tuple[Config, StudyGrid]:
    saved = json.loads((study_dir / "study.json").read_text())
    return Config.from_dict(saved["base"]), StudyGrid(**saved["grid"])


def _has_final(run_dir: Path) -> bool:
    return any(r.get("event") == "final" for r in RunDir(run_dir).read_metrics())


# --------------------------------------------------------------------------- the grid


def test_grid_runs_vary_only_the_grid_axes():
    base = Config(hidden_size=32, epochs=3, bptt=7, lr=0.7, strategy="awd", strategy_p=0.1,
                  cell="rnn", seed=9)
    grid = StudyGrid(("none", "zaremba", "variational"), (0.2, 0.5), ("lstm", "gru"), (1, 2))
    runs = grid_runs(base, grid)
    # none ignores the rate: one run per cell and seed instead of one per rate.
    assert len(runs) == 2 * 2 * (1 + 2 * 2)
    assert len({name for name, _ in runs}) == len(runs)
    for name, config in runs:
        assert config.replace(strategy=base.strategy, strategy_p=base.strategy_p, cell=base.cell,
                              seed=base.seed) == base
        assert name == study.run_name(config)
    names = dict(runs)
    assert names["lstm-zaremba-p0.5-s1"].strategy_p == 0.5
    assert names["gru-none-p0-s2"].strategy_p == 0.0
    assert not any("none-p0.2" in name for name in names)


@pytest.mark.parametrize("axes, message", [
    (dict(strategies=("none", "dropall")), "unknown strategy"),
    (dict(cells=("lstm", "transformer")), "unknown cell"),
    (dict(rates=(0.5, 1.5)), r"\[0, 1\]"),
    (dict(rates=(-0.1,)), r"\[0, 1\]"),
    (dict(seeds=()), "at least one of seeds"),
    (dict(seeds=(1, 1)), "twice"),
])
def test_grid_rejects_bad_axes(axes, message):
    fields = dict(strategies=("none",), rates=(0.5,), cells=("lstm",), seeds=(1,)) | axes
    with pytest.raises(ValueError, match=message):
        StudyGrid(**fields)


@pytest.mark.parametrize("flags, message", [
    (["--strategies", "none,bogus"], "unknown strategy name(s) 'bogus'"),
    (["--cells", "lstm,tcn"], "unknown cell name(s) 'tcn'"),
    (["--rates", "0.2,1.5"], "[0, 1]"),
])
def test_compare_reports_bad_lists_clearly(flags, message, tmp_path, capsys):
    code = cli.main(["compare", "--out", str(tmp_path / "s"), *flags, *TINY_FLAGS])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing is written for a grid that is refused


def test_compare_rejects_malformed_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--out", str(tmp_path), "--rates", "0.2,half"])
    assert "comma-separated numbers" in capsys.readouterr().err


# --------------------------------------------------------------------------- the report


@pytest.mark.slow
def test_compare_writes_report_tables_and_figures(finished_study, capsys):
    # study.json, and each of the four runs' config.json, vocab.json and metrics.jsonl
    assert assert_strict_json(finished_study) >= 1 + 4 * 3
    markdown = (finished_study / "report.md").read_text()
    page = (finished_study / "report.html").read_text()
    for strategy in ("none", "variational"):
        assert f"### {strategy}:" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| lstm |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["0", "2"], ["0.5", "2"]]
    assert all(" ± " in row for row in rows)  # two seeds: mean ± std
    assert "What the numbers say" in markdown and "lowest valid perplexity" in markdown
    figures = sorted(p.name for p in (finished_study / "figures").iterdir())
    # No rates-lstm.png: each strategy ran at one rate, so there is no curve against the rate.
    assert figures == ["curves-lstm.png", "hidden-states.png", "placement-none.png",
                       "placement-variational.png"]
    for name in figures:
        pixels = matplotlib.image.imread(finished_study / "figures" / name)[..., :3]
        assert 0.01 < (pixels < 0.9).any(-1).mean() < 0.9, f"{name} looks blank"
        assert f"figures/{name}" in markdown
    # Self-contained: every figure embedded, none linked.
    assert page.count("data:image/png;base64,") == len(figures)
    assert "figures/" not in page
    assert "<td>lstm</td>" in page


@pytest.mark.slow
def test_one_seed_has_no_spread(study_copy):
    for run in ("lstm-none-p0-s2", "lstm-variational-p0.5-s2"):
        shutil.rmtree(study_copy / "runs" / run)
    markdown = write_report(study_copy).read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| lstm |")]
    assert len(rows) == 2 and not any("±" in row for row in rows)


@pytest.mark.slow
def test_report_only_regenerates_from_existing_runs(study_copy, capsys, monkeypatch):
    (study_copy / "report.md").unlink()
    monkeypatch.setattr(study, "train", _forbidden)
    assert cli.main(["compare", "--out", str(study_copy), "--report-only"]) == 0
    assert capsys.readouterr().out.strip() == str(study_copy / "report.md")
    assert (study_copy / "report.md").is_file()
    assert cli.main(["compare", "--out", str(study_copy), "--report-only", "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err


def _forbidden(*args, **kwargs):
    raise AssertionError("nothing should be trained")


@pytest.mark.slow
@torch.no_grad()
def test_heatmap_masks_differ_only_in_how_often_they_are_drawn(study_copy, module_corpus,
                                                               monkeypatch):
    """The report's hidden-state figure, read back from the Figure it saves."""
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda self, *a, **k: figures.append(self) or savefig(self, *a, **k))
    write_report(study_copy, data_dir=module_corpus)
    (figure,) = [f for f in figures if f.get_suptitle().endswith("after output dropout")]
    panels = {ax.get_title(): torch.from_numpy(np.asarray(ax.images[0].get_array()))
              for ax in figure.axes if ax.images}
    # The run it names and the valid tokens it labels: the same forward, recomputed here.
    model, vocab, config = load_model(study_copy / "runs" / figure.get_suptitle().split(":")[0],
                                      device="cpu")
    tokens = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    ids = Corpus.load(module_corpus, config.level, vocab).valid[:len(tokens)].unsqueeze(1)
    assert vocab.decode(ids[:, 0]) == tokens
    assert torch.equal(panels["no dropout"], model.eval()(ids).dropped[:, 0].double())
    held, fresh = panels["one mask per sequence"], panels["fresh mask each step"]
    dropped_units = held == 0
    # One mask per sequence: a unit dropped at one step is dropped at every step.
    assert dropped_units.any() and torch.equal(dropped_units.all(0), dropped_units.any(0))
    assert not torch.equal((fresh == 0).all(0), (fresh == 0).any(0))
    # Both start from the same first draw. With one row, the held recurrent mask is also one
    # mask for the whole batch, so it runs on the fused kernel (as W_hh's columns) while the
    # fresh one runs the own loop: the same numbers up to float32 rounding.
    torch.testing.assert_close(held[0], fresh[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- resuming


@pytest.mark.slow
def test_interrupted_study_retrains_only_unfinished_runs(study_copy, module_corpus, monkeypatch):
    damaged = RunDir(study_copy / "runs" / RUNS[2])
    damaged.truncate_metrics(lambda r: r.get("event") != "final")  # killed before the end
    shutil.rmtree(study_copy / "runs" / RUNS[1])                   # never started
    calls = []
    real_train = study.train

    def counting(config, out, **kwargs):
        calls.append((Path(out).name, kwargs["resume"]))
        assert Path(kwargs["data_dir"]) == Path(module_corpus).resolve()
        return real_train(config, out, **kwargs)

    monkeypatch.setattr(study, "train", counting)
    # Rerun without --data-dir: the study's recorded corpus, not $RNNREG_DATA, is used.
    monkeypatch.setenv("RNNREG_DATA", str(study_copy / "nowhere"))
    base, grid = _base(study_copy)
    run_study(base, grid, study_copy, progress=False)
    assert sorted(calls) == [(RUNS[1], False), (RUNS[2], True)]
    assert all(_has_final(study_copy / "runs" / name) for name in RUNS)


@pytest.mark.slow
def test_a_study_with_other_settings_is_refused(study_copy, module_corpus, monkeypatch):
    monkeypatch.setattr(study, "train", _forbidden)
    base, grid = _base(study_copy)
    with pytest.raises(RunDirError, match="different settings.*epochs"):
        run_study(base.replace(epochs=2), grid, study_copy, data_dir=module_corpus,
                  progress=False)


@pytest.mark.slow
def test_backend_is_replaceable(study_copy, module_corpus):
    shutil.rmtree(study_copy / "runs" / RUNS[0])
    seen = []

    def recording(jobs, done):
        for job in jobs:
            seen.append(job)
            done(job, "finished")

    base, grid = _base(study_copy)
    run_study(base, grid, study_copy, data_dir=module_corpus, progress=False,
              backend=recording)
    assert [(job.name, job.resume) for job in seen] == [(RUNS[0], False)]


@pytest.mark.slow
def test_parallel_jobs_resume_in_worker_processes(study_copy, module_corpus):
    untouched = study_copy / "runs" / RUNS[0] / "metrics.jsonl"
    before = untouched.stat().st_mtime_ns
    for name in RUNS[2:]:
        shutil.rmtree(study_copy / "runs" / name)
    base, grid = _base(study_copy)
    run_study(base, grid, study_copy, data_dir=module_corpus, jobs=2, progress=False)
    assert all(_has_final(study_copy / "runs" / name) for name in RUNS[2:])
    assert untouched.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- plans and claims


def test_the_cli_names_every_plan():
    from rnnreg.cli.study import _PLANS

    assert _PLANS == tuple(study.PLANS)
    for regimes in study.PLANS.values():
        assert [r.name for r in regimes] == ["text", "text-rnn", "memory", "memory-rnn"]
        for regime in regimes:
            assert regime.base.cell == "lstm"  # every preset and override builds a Config
            assert min(len(grid.seeds) for grid in regime.grids) >= 2


def test_compare_refuses_a_plan_with_a_grid_of_its_own(tmp_path, capsys):
    code = cli.main(["compare", "--out", str(tmp_path / "s"), "--plan", "quick",
                     "--strategies", "none"])
    assert code == 2
    assert "--plan runs its own grids" in capsys.readouterr().err


@pytest.mark.slow
def test_a_plan_trains_its_regimes_and_its_report_opens_with_the_claims(tmp_path, module_corpus,
                                                                       monkeypatch):
    from rnnreg.lm.corpus.recall import RecallTask

    tiny = dict(hidden_size=8, num_layers=1, bptt=5, batch_size=4, epochs=2, eval_bptt=50,
                checkpoint_minutes=0.0, device="cpu", valid_batch_size=1)
    seeds = (1, 2)
    plan = (
        study.Regime("text", "small", (StudyGrid(("none", "zaremba"), (0.5,), ("lstm",),
                                                 seeds),), tiny),
        study.Regime("memory", "study-recall", (StudyGrid(("zaremba", "naive"), (0.5,),
                                                          ("lstm",), seeds),),
                     {**tiny, "bptt": 12}, RecallTask(distances=(2, 6), segments=(40, 10, 30))),
    )
    monkeypatch.setattr(study, "PLANS", {**study.PLANS, "tiny": plan})
    out = study.run_plan("tiny", tmp_path / "plan", data_dir=module_corpus, progress=False)
    markdown = write_report(out).read_text()
    page = (out / "report.html").read_text()
    assert json.loads((out / "study.json").read_text())["regimes"] == ["text", "memory"]
    assert (out / "text" / "report.md").is_file() and (out / "memory" / "report.md").is_file()
    # The claims table comes first, with a verdict for every claim of the plan's regimes.
    first_heading = next(line for line in markdown.splitlines() if line.startswith("## "))
    assert first_heading == "## The tutorial's claims"
    claim_rows = [line for line in markdown.splitlines() if " | text | " in line
                  or " | memory | " in line]
    tested = [row for row in claim_rows if "not tested" not in row]
    assert any("lstm zaremba p=0.5 better than lstm none" in row for row in tested)
    assert any("recall accuracy at the longest N" in row for row in tested)
    assert "<h2>The tutorial&#39;s claims</h2>" in page or "<h2>The tutorial's claims</h2>" in page
    pixels = matplotlib.image.imread(out / "figures" / "recall-memory-lstm.png")[..., :3]
    assert 0.01 < (pixels < 0.9).any(-1).mean() < 0.9  # drawn, not blank
    assert page.count("data:image/png;base64,") == 1  # the memory figure, embedded
    assert "| N = 2 | N = 6 |" in markdown
    assert str(module_corpus) not in markdown  # the corpus by name and checksum, not its path
    # A regime's own report opens with the claims of that regime only.
    regime = (out / "memory" / "report.md").read_text()
    assert "recall accuracy at the longest N" in regime and "(test perplexity)" not in regime
    # Rerunning resumes: nothing left to train.
    monkeypatch.setattr(study, "train", _forbidden)
    study.run_plan("tiny", out, progress=False)
    # Moved without its recall corpus (results keep recall.json only), the report is rewritten.
    moved = Path(shutil.move(out, tmp_path / "moved"))
    for text in (moved / "memory" / "corpus").glob("*.txt"):
        text.unlink()
    assert write_report(moved, data_dir=module_corpus).read_text() == markdown
