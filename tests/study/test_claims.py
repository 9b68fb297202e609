"""The tutorial's claims: verdicts computed from synthetic runs, the statistics behind them, and
the claims table in both report formats."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rnnreg.lm.config import Config
from rnnreg.study import claims as c
from rnnreg.study.claims import CLAIMS, Evidence, evaluate, f_quantile, measure_runs, t_quantile
from rnnreg.study.document import Document, render_html, render_markdown
from rnnreg.study.results import RunResult
from rnnreg.study.verdicts import _claims_table, _evidence_text

SEEDS = (1, 2, 3)


# Valid perplexity turning up after epoch 2: every synthetic run overfits unless told otherwise.
OVERFIT = ({"epoch": 1, "valid_ppl": 300.0}, {"epoch": 2, "valid_ppl": 250.0},
           {"epoch": 3, "valid_ppl": 270.0})
STEADY = ({"epoch": 1, "valid_ppl": 300.0}, {"epoch": 2, "valid_ppl": 250.0},
          {"epoch": 3, "valid_ppl": 240.0})


def _run(strategy: str, rate: float, seed: int, test_ppl: float | None, cell: str = "lstm",
         name: str | None = None, epochs: tuple[dict, ...] = OVERFIT) -> RunResult:
    config = Config(strategy=strategy, strategy_p=rate, cell=cell, seed=seed)
    final = None if test_ppl is None else {"test_ppl": test_ppl, "valid_ppl": test_ppl}
    return RunResult(name or f"{cell}-{strategy}-p{rate:g}-s{seed}", Path("unused"), config,
                     epochs, final)


def _arm(strategy: str, rate: float, values, cell: str = "lstm") -> list[RunResult]:
    return [_run(strategy, rate, seed, value, cell) for seed, value in zip(SEEDS, values)]


def _evidence(runs: list[RunResult], regime: str = "text", recall=None) -> Evidence:
    return Evidence({regime: runs}, measure_runs(regime, runs, recall))


def _verdicts(runs: list[RunResult], regime: str = "text", recall=None) -> dict[str, c.Verdict]:
    return {v.claim.key: v for v in evaluate(CLAIMS, _evidence(runs, regime, recall))}


# Seed effects shared by every arm: a paired comparison removes them, an unpaired one would not.
SEED_EFFECT = (0.0, 30.0, -25.0)


def _shifted(mean: float, noise=(0.0, 0.0, 0.0)) -> list[float]:
    return [mean + effect + n for effect, n in zip(SEED_EFFECT, noise)]


def test_student_t_and_f_quantiles_match_published_tables():
    # Two-sided 95% critical values of Student's t, and upper 2.5% points of F.
    for df, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, 3) == pytest.approx(-3.1824, abs=1e-4)
    for d1, d2, expected in ((2, 2, 39.0), (4, 4, 9.6045), (2, 10, 5.4564)):
        assert f_quantile(0.975, d1, d2) == pytest.approx(expected, rel=1e-4)
    # The lower point is the reciprocal of the upper one with the degrees swapped.
    assert f_quantile(0.025, 3, 5) == pytest.approx(1 / f_quantile(0.975, 5, 3), rel=1e-6)


def test_a_clear_paired_difference_is_supported_despite_large_seed_effects():
    runs = (_arm("none", 0.0, _shifted(200.0)) + _arm("zaremba", 0.5, _shifted(180.0, (0, 1, -1)))
            + _arm("naive", 0.5, _shifted(190.0, (1, 0, -1))))
    verdicts = _verdicts(runs)
    beats = verdicts["zaremba-beats-none"]
    assert beats.verdict == c.SUPPORTED
    assert beats.difference == pytest.approx(20.0)  # positive: favours zaremba (lower ppl)
    differences = [20.0, 19.0, 21.0]
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert beats.interval == pytest.approx((20 - half, 20 + half), abs=1e-3)
    assert beats.seeds == SEEDS
    assert set(beats.runs) == {r.name for r in runs if r.config.strategy in ("none", "zaremba")}
    assert sum(differences) / 3 == pytest.approx(beats.difference)
    assert verdicts["naive-worse"].verdict == c.SUPPORTED


def test_the_opposite_difference_contradicts_and_a_noisy_one_is_inconclusive():
    runs = _arm("none", 0.0, _shifted(180.0)) + _arm("zaremba", 0.5, _shifted(200.0, (0, 1, -1)))
    assert _verdicts(runs)["zaremba-beats-none"].verdict == c.CONTRADICTED
    noisy = _arm("none", 0.0, _shifted(200.0)) + _arm("zaremba", 0.5, _shifted(198, (-9, 8, 4)))
    verdict = _verdicts(noisy)["zaremba-beats-none"]
    assert verdict.verdict == c.INCONCLUSIVE
    low, high = verdict.interval
    assert low < 0 < high
    # Paired differences 11, -6, -2: mean 1, sd 8.9; deciding needs about (2 * 8.9)^2 seeds.
    assert verdict.note == "at this mean and spread more than 100 seeds would be needed"
    # From the t table: t(1) / sqrt(2) = 9.0, t(2) / sqrt(3) = 2.48, t(3) / sqrt(4) = 1.59 < 2.
    assert c.seeds_to_decide(2.0, 1.0) == "at this mean and spread about 4 seeds would decide it"


def test_a_missing_strategy_is_not_tested_and_one_seed_is_inconclusive():
    runs = _arm("none", 0.0, _shifted(200.0)) + _arm("zaremba", 0.5, _shifted(180.0))
    verdicts = _verdicts(runs)
    for key in ("naive-worse", "variational-beats-naive", "recurrent-only-no-help", "gru"):
        assert verdicts[key].verdict == c.NOT_TESTED
        assert verdicts[key].difference is None
    # Claims of another regime are not tested by text runs.
    assert verdicts["memory-zaremba-lstm"].verdict == c.NOT_TESTED
    one = [_run("none", 0.0, 1, 200.0), _run("zaremba", 0.5, 1, 150.0)]
    verdict = _verdicts(one)["zaremba-beats-none"]
    assert verdict.verdict == c.INCONCLUSIVE and verdict.interval is None
    # A diverged run (no final record) counts as missing: its seed drops out of the pairs.
    partial = runs[:3] + [_run("zaremba", 0.5, 1, 180.0), _run("zaremba", 0.5, 2, None),
                          _run("zaremba", 0.5, 3, None)]
    assert _verdicts(partial)["zaremba-beats-none"].seeds == (1,)


def test_a_claim_whose_premise_failed_says_so():
    zaremba = _arm("zaremba", 0.5, _shifted(180.0, (0, 1, -1)))
    steady = [_run("none", 0.0, seed, value, epochs=STEADY if seed != 3 else OVERFIT)
              for seed, value in zip(SEEDS, _shifted(200.0))]
    verdict = _verdicts(steady + zaremba)["zaremba-beats-none"]
    assert verdict.verdict == c.NOT_MET
    assert verdict.difference == pytest.approx(20.0)  # computed and shown all the same
    assert "rose after its minimum in 1 of 3 seeds" in verdict.note
    assert "would be supported" in verdict.note
    mostly = [_run("none", 0.0, seed, value, epochs=OVERFIT if seed != 3 else STEADY)
              for seed, value in zip(SEEDS, _shifted(200.0))]
    assert _verdicts(mostly + zaremba)["zaremba-beats-none"].verdict == c.SUPPORTED


def test_no_better_and_at_least_as_good_use_the_margin():
    none = _arm("none", 0.0, _shifted(200.0))
    level = _arm("recurrent_only", 0.5, _shifted(200.0, (0.5, -0.4, 0.2)))
    assert _verdicts(none + level)["recurrent-only-no-help"].verdict == c.SUPPORTED
    helps = _arm("recurrent_only", 0.5, _shifted(180.0, (0.5, -0.4, 0.2)))
    assert _verdicts(none + helps)["recurrent-only-no-help"].verdict == c.CONTRADICTED
    zaremba = _arm("zaremba", 0.5, _shifted(150.0))
    # 1 perplexity worse is within 2% of 150: "at least as good" holds.
    close = _arm("variational", 0.5, _shifted(151.0, (0.2, -0.2, 0.1)))
    assert _verdicts(zaremba + close)["variational-vs-zaremba"].verdict == c.SUPPORTED
    far = _arm("variational", 0.5, _shifted(160.0, (0.2, -0.2, 0.1)))
    assert _verdicts(zaremba + far)["variational-vs-zaremba"].verdict == c.CONTRADICTED


def test_spread_claim_compares_seed_variances():
    steady = _arm("variational", 0.5, [150.0, 150.1, 149.9])
    wild = _arm("zaremba", 0.5, [130.0, 170.0, 150.0])
    verdict = _verdicts(steady + wild)["variational-steadier"]
    assert verdict.difference == pytest.approx(400.0 / 0.01)
    assert verdict.verdict == c.SUPPORTED
    assert _verdicts(_arm("variational", 0.5, [130.0, 170.0, 150.0])
                     + _arm("zaremba", 0.5, [150.0, 150.1, 149.9]))[
        "variational-steadier"].verdict == c.CONTRADICTED
    similar = _arm("variational", 0.5, [140.0, 165.0, 150.0])
    assert _verdicts(similar + wild)["variational-steadier"].verdict == c.INCONCLUSIVE


def test_changing_one_strategys_runs_changes_the_verdicts():
    base = (_arm("none", 0.0, _shifted(200.0)) + _arm("naive", 0.5, _shifted(190.0, (1, 0, -1)))
            + _arm("variational", 0.5, _shifted(185.0, (0, 1, -1))))
    good = _arm("zaremba", 0.5, _shifted(180.0, (0, 1, -1)))
    bad = _arm("zaremba", 0.5, _shifted(210.0, (0, 1, -1)))
    before, after = _verdicts(base + good), _verdicts(base + bad)
    changed = {key for key in before if before[key].verdict != after[key].verdict}
    assert changed == {"zaremba-beats-none", "naive-worse", "variational-vs-zaremba"}
    assert after["zaremba-beats-none"].verdict == c.CONTRADICTED


def test_memory_claims_read_recall_by_distance():
    accuracy = {"zaremba": (1.0, 0.98), "variational": (1.0, 0.97), "naive": (0.95, 0.40)}
    noise = {1: 0.0, 2: 0.01, 3: -0.01}
    runs = [_run(name, 0.5, seed, 10.0) for name in accuracy for seed in SEEDS]

    def recall(run: RunResult) -> dict[int, float]:
        short, long = accuracy[run.config.strategy]
        return {2: short, 10: (short + long) / 2, 40: long + noise[run.config.seed]}

    verdicts = _verdicts(runs, "memory", recall)
    for key in ("memory-zaremba-lstm", "memory-variational-lstm", "memory-falls-with-n-lstm"):
        assert verdicts[key].verdict == c.SUPPORTED, key
    assert verdicts["memory-zaremba-lstm"].difference == pytest.approx(0.58)
    # naive never learnt the task (20% at the shortest N): its comparisons test nothing.
    accuracy["naive"] = (0.2, 0.1)
    verdicts = _verdicts(runs, "memory", recall)
    for key in ("memory-zaremba-lstm", "memory-variational-lstm", "memory-falls-with-n-lstm"):
        assert verdicts[key].verdict == c.NOT_MET, key
        assert "lstm naive p=0.5 did not learn the task (recall 20%" in verdicts[key].note
    accuracy["naive"] = (0.95, 0.40)
    evidence = _evidence(runs, "memory", recall)
    assert "naive recalls 95% at the shortest N, 40% at the longest" in _evidence_text(
        verdicts["memory-zaremba-lstm"], evidence)
    # The rnn claims live in their own regime: not tested by lstm runs.
    assert verdicts["memory-zaremba-rnn"].verdict == c.NOT_TESTED


def test_claims_table_renders_run_text_escaped_in_both_formats(tmp_path):
    runs = [_run("none", 0.0, seed, value, name=f"none|<b>s{seed}</b>*")
            for seed, value in zip(SEEDS, _shifted(200.0))]
    runs += _arm("zaremba", 0.5, _shifted(180.0, (0, 1, -1)))
    evidence = _evidence(runs)
    blocks = _claims_table(evaluate(CLAIMS, evidence), evidence)
    document = Document("claims", tuple(blocks))
    markdown = render_markdown(document)
    html = render_html(document, tmp_path)
    assert "none\\|&lt;b>s1&lt;/b>\\*" in markdown  # Markdown's own escapes
    assert "<b>s1" not in markdown
    assert "none|&lt;b&gt;s1&lt;/b&gt;*" in html and "<b>s1" not in html
    for text in (markdown, html):
        assert "supported" in text and "not tested" in text
    header = next(line for line in markdown.splitlines() if line.startswith("| claim"))
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    # One row per claim, each with as many cells as the header: no stray | split a cell.
    assert len(rows) == 2 + len(CLAIMS)
    columns = header.count(" | ")
    assert all(row.replace("\\|", "").count(" | ") == columns for row in rows)
