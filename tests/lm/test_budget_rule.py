"""The budget rule (rnnreg.lm.presets.budget_config): rows measured by
benchmarks/budget_sweep.py, derived again here from the committed sweep, and answering any
budget and vocabulary with a measured recipe."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from rnnreg.errors import RnnregError
from rnnreg.lm.presets import BUDGET_RULE, BUDGET_RULE_PATH, budget_config, preset_config
from support import REPO_ROOT

SWEEP = REPO_ROOT / "results" / "budget-sweep"
BASE = preset_config(BUDGET_RULE["base"])


def _sweep_module():
    spec = importlib.util.spec_from_file_location(
        "budget_sweep", REPO_ROOT / "benchmarks" / "budget_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_rule_is_what_the_committed_runs_give():
    """Nobody types the rule: choosing again from the committed runs' final records gives the
    file the library reads, row for row."""
    sweep = _sweep_module()
    runs = sweep.plan_runs(SWEEP, None)
    facts = json.loads((SWEEP / "corpora.json").read_text(encoding="utf-8"))
    assert sweep.derive_rule(runs, facts) == json.loads(BUDGET_RULE_PATH.read_text("utf-8"))


def test_each_row_is_the_lowest_valid_of_its_corpus_budget_and_softmax():
    """Read straight from the metrics files, independently of the sweep script (a record
    written before Config had ``softmax`` trained the full one)."""
    finals = {}
    for metrics in (SWEEP / "runs").glob("*/metrics.jsonl"):
        records = [json.loads(line) for line in metrics.read_text("utf-8").splitlines()]
        final = [r for r in records if r.get("event") == "final"]
        config = json.loads((metrics.parent / "config.json").read_text("utf-8"))["config"]
        if final:
            finals[metrics.parent.name] = (final[-1]["valid_ppl"], config)
    for row in BUDGET_RULE["rows"]:
        prefix = f"{row['corpus']}-{row['minutes']:g}min-"
        rivals = {name: valid for name, (valid, config) in finals.items()
                  if name.startswith(prefix)
                  and config.get("softmax", "full") == row["config"].get("softmax", BASE.softmax)}
        assert min(rivals, key=rivals.get) == row["run"]
        everyone = [valid for name, (valid, _) in finals.items() if name.startswith(prefix)]
        assert row["best"] == (min(rivals.values()) == min(everyone))


@pytest.mark.parametrize("minutes", [0.25, 1, 5, 8.5, 12, 20, 30, 45, 600])
@pytest.mark.parametrize("vocab", [2, 700, 10_000, 18_000, 250_000])
def test_every_budget_gets_a_measured_recipe(minutes, vocab):
    config = budget_config(minutes, vocab)
    assert config.max_train_minutes == minutes and config.lr_schedule == "cosine"
    rows = [r for r in BUDGET_RULE["rows"] if r["best"]]
    nearest = min(abs(math.log(r["vocab"] / vocab)) for r in rows)
    candidates = [r for r in rows if abs(math.log(r["vocab"] / vocab)) == nearest]
    chosen = [r for r in candidates
              if BASE.replace(**r["config"], max_train_minutes=float(minutes)) == config]
    assert chosen, "the recipe is none of the measured rows of the nearest corpus"
    measured_below = [r["minutes"] for r in candidates if r["minutes"] <= minutes]
    if measured_below:  # never a recipe measured for a longer budget than this one
        assert any(r["minutes"] == max(measured_below) for r in chosen)


def test_a_measured_budget_gets_its_own_recipe():
    for row in BUDGET_RULE["rows"]:
        if not row["best"]:
            continue
        at_row = budget_config(row["minutes"], row["vocab"])
        assert at_row == BASE.replace(**row["config"], max_train_minutes=float(row["minutes"]))


def test_softmax_restricts_the_recipe_to_that_decoder():
    for softmax in {r["config"].get("softmax", BASE.softmax) for r in BUDGET_RULE["rows"]}:
        config = budget_config(12, 10_000, softmax=softmax)
        assert config.softmax == softmax and config.tie_weights == (softmax == "full")


@pytest.mark.parametrize("minutes", [0, -5, math.nan, math.inf])
def test_nonsense_budgets_are_refused(minutes):
    with pytest.raises(RnnregError, match="budget"):
        budget_config(minutes, 10_000)


def test_a_vocabulary_below_two_words_is_refused():
    with pytest.raises(RnnregError, match="vocab_size"):
        budget_config(12, 1)
