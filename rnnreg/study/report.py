"""The study report: every run of a study read back, grouped, and written as Markdown and HTML.

Split from :mod:`rnnreg.study.grid` so that scheduling runs and describing them stay separate ideas:
the report reads only run directories, so it works on any study however its runs were trained.
Reading and grouping them is :mod:`rnnreg.study.results`; this module is the document (its
sections, findings, tables and figures).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rnnreg.lm.config import Config
from rnnreg.lm.corpus.batches import Corpus
from rnnreg.lm.corpus.sources import CorpusLocation, DataError, locate_corpus
from rnnreg.lm.evaluation import load_model
from rnnreg.lm.model import LanguageModel, ModelMasks
from rnnreg.lm.rundir.curves import learning_curves
from rnnreg.lm.rundir.files import RunDirError
from rnnreg.lm.rundir.layout import RunDir
from rnnreg.nn.regularization import Schedule
from rnnreg.nn.strategies import STRATEGIES
from rnnreg.study import plots
from rnnreg.study.document import (
    Bullets,
    Document,
    Figure,
    Heading,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from rnnreg.study.layout import StudyDir
from rnnreg.study.results import Group, RunResult, group_runs, read_runs
from rnnreg.study.sampling import named_schedules, schedules, stack_steps
from rnnreg.study.verdicts import claims_blocks, write_plan_report

__all__ = ["write_report"]

# Tokens of the valid split drawn in the hidden-state heatmaps: enough to see masks persist
# across steps, few enough that every token can be labelled.
_HEATMAP_TOKENS = 40


def write_report(out: str | Path, *, data_dir: str | Path | None = None) -> Path:
    """Write study directory ``out``'s report as Markdown and as one self-contained HTML page
    (:class:`~rnnreg.study.layout.StudyDir`); returns the Markdown file's path.

    Reads only the run directories, so it can be regenerated at any time, also mid-study.
    ``data_dir`` (for the hidden-state heatmaps) defaults to the one in ``study.json``.
    """
    study = StudyDir(out)
    if study.is_plan():  # a study of several regimes: a report per regime, the claims over them
        return write_plan_report(study.path, write_report, data_dir)
    groups = group_runs(read_runs(study.path))
    if not groups:
        raise RunDirError(f"{study.runs} holds no run yet; nothing to report")
    record = study.read_record()
    data = locate_corpus(data_dir, record.get("data_dir"))
    title = _title(groups)
    document = Document(title, (
        Heading(title, 1), *claims_blocks(study.path), *_overview(record, groups),
        Heading("What the numbers say"), Bullets(tuple(_findings(groups))),
        *_tables(groups), *_curves(study, groups), *_rates(study, groups),
        *_heatmaps(study, groups, data), *_placements(study, groups)))
    return study.write_report(render_markdown(document), render_html(document, study.path))


def _title(groups: Sequence[Group]) -> str:
    """What this study compares, from its runs: two studies in one repository differ by it."""
    strategies = list(dict.fromkeys(g.strategy for g in groups))
    names = (", ".join(strategies[:-1]) + " and " + strategies[-1] if len(strategies) > 1
             else strategies[0])
    cells = ", ".join(dict.fromkeys(g.cell.upper() for g in groups))
    return f"Dropout study: {names} ({cells})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _corpora(groups: Sequence[Group]) -> str:
    """The corpus the runs were trained on, by name and MD5 from each run's corpus record, never
    by the path of the machine that ran them (which means nothing to a reader)."""
    described: dict[str, None] = {}
    for run in (run for group in groups for run in group.runs):
        record = RunDir(run.path).read_corpus()
        if record is None:
            described["not recorded by the run"] = None
            continue
        files = "; ".join(f"{info['name']} MD5 {info['md5']}"
                          for _, info in sorted(record.get("files", {}).items(), key=_split_order))
        described[f"{Path(record.get('data_dir', '')).name or 'corpus'} ({files})"] = None
    if len(described) == 1:
        return f"data: {next(iter(described))}"
    return f"data differs between runs: {' | '.join(described)}"


def _split_order(item: tuple[str, dict]) -> int:
    order = ("train", "valid", "test")  # a one-file corpus's single role ("text") goes last
    return order.index(item[0]) if item[0] in order else len(order)


def _overview(study: dict, groups: Sequence[Group]) -> list:
    runs = [run for group in groups for run in group.runs]
    unfinished = [run.name for run in runs if run.final is None]
    blocks = [Paragraph(f"{len(runs)} runs, {len(runs) - len(unfinished)} finished. Each row "
                        "below is the mean ± standard deviation over seeds (no deviation for "
                        "a single seed).")]
    if "base" in study:
        base = Config.from_dict(study["base"])
        blocks.append(Paragraph(
            f"Held equal in every run: {_plural(base.num_layers, 'layer')} of "
            f"{base.hidden_size} units, {_plural(base.epochs, 'epoch')}, batch "
            f"{base.batch_size}, bptt {base.bptt}, lr {base.lr:g} decayed by "
            f"{base.lr_decay:g} after epoch {base.decay_after}; {_corpora(groups)}."))
    if unfinished:
        blocks.append(Paragraph("No final record (still running, interrupted or diverged): "
                                + ", ".join(unfinished) + "."))
    return blocks


def _findings(groups: Sequence[Group]) -> list[str]:
    """Plain statements computed from the numbers; nothing beyond what the table shows."""
    findings = []
    for cell in dict.fromkeys(g.cell for g in groups):
        ranked = sorted((g for g in groups if g.cell == cell and g.stat("valid")),
                        key=lambda g: g.stat("valid").mean)
        if not ranked:
            continue
        best = ranked[0]
        findings.append(f"{cell}: lowest valid perplexity {best.stat('valid').text()} from "
                        f"{best.label} (test {best.stat('test').text()}, "
                        f"{len(best.finished)} seed(s)).")
        if len(ranked) > 1:
            findings.append(_runner_up(cell, best, ranked[1]))
        findings.extend(_gap_finding(cell, ranked))
    findings.extend(_overfitting(groups))
    return findings or ["No run has finished yet."]


def _runner_up(cell: str, best: Group, second: Group) -> str:
    first, other = best.stat("valid"), second.stat("valid")
    # Two decimals: the difference between close configurations would round away at one.
    difference = other.mean - first.mean
    text = f"{cell}: next is {second.label} at {other.text()}, {difference:.2f} higher"
    if first.std is not None and other.std is not None:
        spread = max(first.std, other.std)
        relation = "smaller" if difference < spread else "not smaller"
        text += (f"; the difference is {relation} than the larger of their seed standard "
                 f"deviations ({spread:.2f})")
    return text + "."


def _gap_finding(cell: str, ranked: Sequence[Group]) -> list[str]:
    """The generalization gap of `none` against Zaremba's placement at its best rate."""
    none = next((g for g in ranked if g.strategy == "none"), None)
    zaremba = next((g for g in ranked if g.strategy == "zaremba"), None)  # ranked: best rate
    if none is None or zaremba is None or not (none.stat("gap") and zaremba.stat("gap")):
        return []
    return [f"{cell}: valid − train gap at the last epoch is {none.stat('gap').text()} without "
            f"dropout and {zaremba.stat('gap').text()} for {zaremba.label} (its lowest-valid "
            f"rate); the train perplexity is measured with dropout active."]


def _overfitting(groups: Sequence[Group]) -> list[str]:
    """Configurations whose mean valid perplexity rose after its minimum: overfitting."""
    rose = []
    for group in groups:
        curve = group.curve()
        if len(curve) < 2:
            continue
        lowest = min(curve, key=lambda r: r["valid_ppl"])
        last = curve[-1]
        if last["valid_ppl"] > lowest["valid_ppl"]:
            rose.append(f"{group.cell} {group.label}: mean valid perplexity was lowest at epoch "
                        f"{lowest['epoch']} ({lowest['valid_ppl']:.2f}) and rose to "
                        f"{last['valid_ppl']:.2f} by epoch {last['epoch']}.")
    if not rose and any(len(g.curve()) > 1 for g in groups):
        return ["No configuration's mean valid perplexity rose after its minimum."]
    return rose


_COLUMNS = ("cell", "p", "seeds", "train ppl", "valid ppl", "test ppl", "gap (valid − train)",
            "tokens/s")


def _tables(groups: Sequence[Group]) -> list:
    blocks = [Heading("Perplexity by strategy"), Paragraph(
        "train: the last epoch's training perplexity, averaged over its windows with dropout "
        "active, as the trainer logs it; valid and test: the final model scored as one stream; "
        "gap: valid − train of the last epoch record; tokens/s: training speed averaged over "
        "epochs, which depends on how many runs shared the machine.")]
    for name in dict.fromkeys(g.strategy for g in groups):
        rows = tuple(_row(g) for g in groups if g.strategy == name and g.finished)
        blocks.append(Heading(f"{name}: {STRATEGIES[name].description}", 3))
        blocks.append(Table(_COLUMNS, rows) if rows else Paragraph("No finished run."))
    return blocks


def _row(group: Group) -> tuple[str, ...]:
    def text(measure: str, digits: int = 1) -> str:
        stat = group.stat(measure)
        return "–" if stat is None else stat.text(digits)

    return (group.cell, f"{group.rate:g}", str(len(group.finished)), text("train"),
            text("valid"), text("test"), text("gap"), text("tokens_per_s", 0))


def _curves(study: StudyDir, groups: Sequence[Group]) -> list:
    blocks = [Heading("Learning curves"), Paragraph(
        "Mean over seeds. A valid curve that turns up while the train curve keeps falling is "
        "overfitting, the failure dropout is meant to prevent.")]
    for cell in dict.fromkeys(g.cell for g in groups):
        path = learning_curves({g.label: g.curve() for g in groups if g.cell == cell},
                               study.figure("curves", cell),
                               title=f"{cell}: train and valid perplexity per epoch")
        blocks.append(Figure(study.relative(path), f"Learning curves, {cell}"))
    return blocks


def _rates(study: StudyDir, groups: Sequence[Group]) -> list:
    blocks = [Heading("Perplexity against dropout rate")]
    for cell in dict.fromkeys(g.cell for g in groups):
        series: dict[str, list[dict]] = {}
        for group in groups:
            valid, test = group.stat("valid"), group.stat("test")
            if group.cell == cell and valid is not None:
                series.setdefault(group.strategy, []).append({
                    "rate": group.rate, "valid": valid.mean, "valid_std": valid.std,
                    "test": test.mean, "test_std": test.std})
        if not any(len(points) > 1 for points in series.values()):
            # A curve needs two rates; one point per strategy is the table above, no figure.
            rates = sorted({point["rate"] for points in series.values() for point in points})
            if rates:
                blocks.append(Paragraph(
                    f"{cell}: no figure, as each strategy ran at one rate only (p = "
                    f"{', '.join(f'{rate:g}' for rate in rates)}): there is no curve against "
                    "the rate to draw. The tables above compare the strategies."))
            continue
        path = plots.rate_curve(series, study.figure("rates", cell),
                                title=f"{cell}: final perplexity (mean ± std over seeds)")
        blocks.append(Figure(study.relative(path), f"Perplexity against rate, {cell}; "
                             "a strategy with a single rate is a dotted reference line"))
    return blocks


def _heatmaps(study: StudyDir, groups: Sequence[Group],
              data: CorpusLocation) -> list:
    blocks = [Heading("Hidden states on real text")]
    finished = [run for group in groups for run in group.finished]
    if not finished:
        return [*blocks, Paragraph("No finished run to draw.")]
    # The largest output rate shows masking most plainly; the paper's placement breaks ties.
    run = max(finished, key=lambda r: (r.config.regularization.output_dropout,
                                       r.config.strategy == "zaremba", r.name))
    try:
        model, vocab, config = load_model(run.path, device="cpu")
    except RunDirError:  # results kept without checkpoints: config and metrics only
        return [*blocks, *_kept_heatmap(study)]
    try:
        corpus = Corpus.load(data, config.level, vocab, split_fractions=config.split_fractions,
                             max_vocab=config.max_vocab, min_count=config.min_count)
    except DataError:  # its text names a path of this machine: no use to a reader
        return [*blocks, Paragraph("Skipped: the corpus's valid split could not be read where "
                                   "the report was written; rewrite it with --data-dir naming "
                                   "the corpus the runs were trained on.")]
    ids = corpus.valid[:_HEATMAP_TOKENS].unsqueeze(1)
    path = plots.hidden_heatmaps(_hidden_panels(model, ids), study.figure("hidden-states"),
                                 tokens=vocab.decode(ids[:, 0]),
                                 title=f"{run.name}: last layer's output after output dropout")
    blocks.append(Figure(study.relative(path), (
        f"Trained weights of {run.name} on the first {ids.size(0)} tokens of the valid split. "
        "Same weights, placements and rates in every panel; only how often the masks are "
        "redrawn differs. One mask per sequence blanks the same units at every step.")))
    return blocks


def _kept_heatmap(study: StudyDir) -> list:
    """The figure a previous report drew, said to be that, or a sentence that there is none."""
    path = study.figure("hidden-states")
    if not path.is_file():
        # Not the error's text: it names this machine's path, which means nothing to a reader.
        return [Paragraph("Not drawn: it needs a trained model's vocabulary and checkpoint, "
                          "and the run directories keep none.")]
    return [Figure(study.relative(path), (
        "Kept from an earlier writing of this report: the checkpoints it was drawn from are "
        "not kept with these runs, so it could not be redrawn. It shows a trained model's "
        "last-layer output on the valid split under no dropout, a fresh mask each step and one "
        "mask per sequence."))]


@torch.no_grad()
def _hidden_panels(model: LanguageModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dropped`` outputs ``(T, H)`` under no dropout, per-step masks and per-sequence masks.

    Both schemes come from ``model.sample_masks`` at the model's own placements and rates: one
    draw is held for the whole sequence (Gal & Ghahramani 2016), or a new draw is taken at
    every step (Zaremba et al. 2014), whichever the model was trained with. Every mask of the
    model's record is redrawn per step, zoneout's included, except those the model draws once
    per window (DropConnect on W_hh, whole-word masks, a batch-shared recurrent mask): they are
    the same in both schemes. A fixed seed in a forked RNG makes the figure reproducible
    without disturbing the caller's random state.
    """
    model.eval()
    steps = ids.size(0)
    per_window = {mask.path for mask, schedule in schedules(model)
                  if schedule == Schedule.WINDOW}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        draws = [model.sample_masks(1, ids.size(1)) for _ in range(steps)]
    fresh: ModelMasks = stack_steps(draws, per_window)
    return {
        "no dropout": model(ids).dropped[:, 0],
        "fresh mask each step": model(ids, None, fresh).dropped[:, 0],
        "one mask per sequence": model(ids, None, draws[0]).dropped[:, 0],
    }


def _placements(study: StudyDir, groups: Sequence[Group]) -> list:
    models = {name: _strategy_model(groups, name)
              for name in dict.fromkeys(g.strategy for g in groups)}
    blocks = [Heading("Where each strategy drops"), Paragraph(
        "Drawn from the dropout settings held by a model built from each strategy's run "
        "config (at its highest rate), not from a table, so they cannot disagree with the "
        "code. Other rates place dropout identically."), *_sampling(models)]
    for name, (run, model) in models.items():
        title = name if name == "none" else f"{name}, p={run.rate:g}"
        path = plots.placement_diagram(model, study.figure("placement", name), title=title)
        blocks.append(Figure(study.relative(path),
                             f"{name}: {STRATEGIES[name].description}"))
    return blocks


def _strategy_model(groups: Sequence[Group], name: str) -> tuple[RunResult, LanguageModel]:
    """The run of strategy ``name`` at its highest rate, and an untrained model of its config."""
    run = max((r for g in groups if g.strategy == name for r in g.runs),
              key=lambda r: (r.rate, r.name))
    # The vocabulary size does not affect where or how often masks are drawn; 2 keeps it tiny.
    return run, LanguageModel(2, run.config)


def _sampling(models: dict[str, tuple[RunResult, LanguageModel]]) -> list:
    """What each strategy samples, one row per mask its model draws (its own record's names)."""
    found = {name: named_schedules(model) for name, (_, model) in models.items()}
    orders: dict[str, tuple[int, ...]] = {}
    for named in found.values():
        for mask, (order, _) in named.items():
            orders[mask] = min(order, orders.get(mask, order))
    rows = tuple((mask, *(named[mask][1] if mask in named else "–" for named in found.values()))
                 for mask in sorted(orders, key=orders.__getitem__))
    text = Paragraph(
        "What each strategy samples when it trains, read from the masks that the same models "
        "draw for one window: a new mask at every step (fresh each step), one mask per row of "
        "the batch held over the window (one per sequence), or one mask for every row and step "
        "(one per window); – where it draws none.")
    if not rows:
        return [text, Paragraph("No strategy in this study draws a mask.")]
    return [text, Table(("mask", *found), rows)]
