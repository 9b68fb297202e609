"""The claims table and the memory figure: a study's runs turned into verdicts on the page.

:mod:`rnnreg.study.claims` holds the claims and the statistics; this module reads a study
directory into their evidence (the runs of every regime, each run's measures, a memory run's
recall by distance) and writes the blocks the report opens with. A study run by a plan
(``rnnreg compare`` without a grid of its own) gets a report of its own here, over its regimes:
the claims table, the memory figure, and a link to every regime's full report.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from rnnreg.lm.corpus.recall import SPEC_FILE, RecallTask
from rnnreg.lm.corpus.sources import PTB_MD5
from rnnreg.study import plots
from rnnreg.study.claims import (
    CLAIMS,
    LONGEST_RECALL,
    NOT_MET,
    NOT_TESTED,
    SHORTEST_RECALL,
    Claim,
    Evidence,
    Verdict,
    evaluate,
    measure_runs,
    runs_text,
)
from rnnreg.study.document import (
    Document,
    Figure,
    Heading,
    Paragraph,
    Table,
    render_html,
    render_markdown,
)
from rnnreg.study.layout import StudyDir
from rnnreg.study.memory import RecallScore, recall_scores
from rnnreg.study.results import RunResult, read_runs

__all__ = ["claims_blocks", "corpus_text", "read_evidence", "write_plan_report"]

_TITLE = "Dropout-strategy study: the tutorial's claims tested"


def _regime_dirs(study: StudyDir) -> dict[str, StudyDir]:
    """Regime name -> its study directory; a single study is one regime named by its data."""
    record = study.read_record()
    if "regimes" in record:
        return {name: study.regime(name) for name in record["regimes"]}
    name = study.path.name
    if name in StudyDir(study.path.parent).read_record().get("regimes", ()):  # a plan's regime
        return {name: study}
    corpus = _corpus_dir(study)
    return {"memory" if corpus and (corpus / SPEC_FILE).is_file() else "text": study}


def _corpus_dir(study: StudyDir) -> Path | None:
    """A study's corpus: a recall corpus inside it (wherever the study was moved), else the
    recorded data directory."""
    if study.has_recall_corpus():
        return _restored(study.corpus)
    data_dir = study.read_record().get("data_dir")
    return Path(data_dir) if data_dir else None


def _restored(corpus: Path) -> Path:
    """The recall corpus of ``corpus/recall.json``, its split files rewritten if absent."""
    record = json.loads((corpus / SPEC_FILE).read_text(encoding="utf-8"))
    return RecallTask(**record["task"]).write(corpus)


class _RecallCache:
    """Each memory run's recall by distance, scored once per report."""

    def __init__(self, corpus: Path | None) -> None:
        self.corpus, self.scores = corpus, {}

    def __call__(self, run: RunResult) -> dict[int, RecallScore]:
        if run.name not in self.scores:
            self.scores[run.name] = recall_scores(run.path, self.corpus)
        return self.scores[run.name]

    def accuracy(self, run: RunResult) -> dict[int, float]:
        return {n: score.accuracy for n, score in self(run).items()}


def read_evidence(out: str | Path) -> tuple[Evidence, dict[str, _RecallCache]]:
    """Every regime's runs and their measures; the recall scorers of the memory regimes."""
    runs, values, recalls = {}, {}, {}
    for regime, directory in _regime_dirs(StudyDir(out)).items():
        if not directory.runs.is_dir():
            continue
        runs[regime] = read_runs(directory.path)
        corpus = _corpus_dir(directory)
        recall = None
        if corpus is not None and (corpus / SPEC_FILE).is_file():
            recalls[regime] = _RecallCache(corpus)
            recall = recalls[regime].accuracy
        values.update(measure_runs(regime, runs[regime], recall))
    return Evidence(runs, values), recalls


def claims_blocks(out: str | Path, claims: Sequence[Claim] = CLAIMS) -> list:
    """The claims table of the study's regimes and how to read it: what the report opens with.

    Only the claims of the regimes the study has: a claim of another regime is no finding.
    """
    evidence, _ = read_evidence(out)
    claims = [claim for claim in claims if claim.regime in evidence.runs]
    return _claims_table(evaluate(claims, evidence), evidence) if claims else []


_HOW_TO_READ = (
    "Each verdict is computed from the runs below: the two arms are compared seed by seed (a "
    "seed fixes the initialization and the data order), and the difference is the mean of the "
    "paired differences with its 95% Student-t interval, signed so that a positive number "
    "favours the first arm (perplexity: lower first arm; accuracy, in points: higher first "
    "arm, or a smaller loss over distance). Supported: the interval lies on the claim's side; "
    "contradicted: on the other side; inconclusive: it straddles. 'At least as good' and 'no "
    "better' allow a negligible difference of 2% of the second arm's perplexity (5 accuracy "
    "points). The spread claim gives the ratio of the two arms' seed variances (second over "
    "first) with its F interval. Premise not met: the claim presupposes what its regime's "
    "runs did not show (the model without dropout overfitting: its valid perplexity rising "
    "after its minimum in most seeds; both arms learning the memory task: at least 50% recall "
    "at the shortest N), so its comparison tests nothing. Not tested: the study holds no "
    "finished run of an arm.")


def _claims_table(verdicts: Sequence[Verdict], evidence: Evidence) -> list:
    rows = tuple((v.claim.text, v.claim.compared, v.claim.regime, v.difference_text,
                  v.verdict, _evidence_text(v, evidence)) for v in verdicts)
    counts = {name: sum(v.verdict == name for v in verdicts)
              for name in ("supported", "contradicted", "inconclusive", NOT_MET, NOT_TESTED)}
    return [
        Heading("The tutorial's claims"),
        Paragraph(", ".join(f"{n} {name}" for name, n in counts.items())
                  + f" of {len(verdicts)} claims. " + _HOW_TO_READ),
        Table(("claim", "compared", "regime", "difference [95% interval]", "verdict", "runs"),
              rows),
    ]


def _evidence_text(verdict: Verdict, evidence: Evidence) -> str:
    parts = [runs_text(verdict)] if verdict.runs else []
    if verdict.note:
        parts.append(verdict.note)
    parts.extend(_overfit_note(verdict, evidence))
    parts.extend(_recall_note(verdict, evidence))
    return "; ".join(parts) or "–"


def _recall_note(verdict: Verdict, evidence: Evidence) -> list[str]:
    """Each arm's mean recall at the shortest and longest N: was the task learnt at all?"""
    claim = verdict.claim
    if not claim.measure.points or verdict.verdict == NOT_TESTED:
        return []
    texts = []
    for arm in (claim.first, claim.second):
        names = [r.name for r in evidence.runs.get(claim.regime, ()) if arm.holds(r)]
        means = []
        for measure in (SHORTEST_RECALL, LONGEST_RECALL):
            values = [evidence.values[key] for name in names
                      if (key := (claim.regime, name, measure.name)) in evidence.values]
            means.append(f"{statistics.fmean(values):.0%}" if values else "–")
        texts.append(f"{arm.strategy} recalls {means[0]} at the shortest N, {means[1]} at "
                     "the longest")
    return ["; ".join(texts)]


def _overfit_note(verdict: Verdict, evidence: Evidence) -> list[str]:
    """Whether the claim's no-dropout arm overfit: its premise, from its seeds' curves."""
    arm = verdict.claim.second
    if arm.strategy != "none" or verdict.verdict == NOT_TESTED:
        return []
    runs = [r for r in evidence.runs.get(verdict.claim.regime, ()) if arm.holds(r) and r.epochs]
    if not runs:
        return []
    rose = sum(min(e["valid_ppl"] for e in r.epochs) < r.epochs[-1]["valid_ppl"] for r in runs)
    return [f"{arm.label}'s valid perplexity rose after its minimum in {rose} of {len(runs)} "
            "seeds (overfitting)"]


# --------------------------------------------------------------------------- memory


def _memory_blocks(study: StudyDir, evidence: Evidence,
                   recalls: dict[str, _RecallCache]) -> list:
    blocks = []
    for regime, recall in recalls.items():
        task = RecallTask(**json.loads((recall.corpus / SPEC_FILE).read_text(
            encoding="utf-8"))["task"])
        blocks += [Heading(f"Memory: accuracy against the distance N ({regime} regime)"),
                   Paragraph(
                       f"The recall corpus: each line is a key (one of {task.symbols}), "
                       f"N - 2 random filler words, a cue, and the key's value, which only the "
                       f"key N tokens earlier predicts; N from {list(task.distances)}, seed "
                       f"{task.seed}. Accuracy: the share of the test split's value tokens "
                       "that the final weights (dropout off) rank first; mean ± std over "
                       f"seeds. Chance is 1/{task.symbols}.")]
        finished = [r for r in evidence.runs.get(regime, ()) if r.final is not None]
        for cell in dict.fromkeys(r.config.cell for r in finished):
            series, rows = {}, []
            for label, runs in _by_arm([r for r in finished if r.config.cell == cell]).items():
                scores = [recall(r) for r in runs]
                points = []
                for n in sorted({n for s in scores for n in s}):
                    values = [s[n].accuracy for s in scores if n in s]
                    std = statistics.stdev(values) if len(values) > 1 else None
                    points.append({"distance": n, "accuracy": statistics.fmean(values),
                                   "accuracy_std": std})
                series[label] = points
                rows.append((label, str(len(runs)), *(
                    f"{p['accuracy']:.3f}" + ("" if p["accuracy_std"] is None
                                              else f" ± {p['accuracy_std']:.3f}")
                    for p in points)))
            if not series:
                continue
            path = plots.recall_curve(series, study.figure("recall", regime, cell),
                                      chance=1 / task.symbols,
                                      title=f"{cell}: recall against distance")
            distances = [p["distance"] for p in next(iter(series.values()))]
            blocks += [Figure(study.relative(path), f"Recall accuracy against N, {cell}"),
                       Table(("strategy", "seeds", *(f"N = {n}" for n in distances)),
                             tuple(r for r in rows if len(r) == 2 + len(distances)))]
    return blocks


def _by_arm(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    arms: dict[str, list[RunResult]] = {}
    for run in sorted(runs, key=lambda r: (r.config.strategy, r.rate, r.config.seed)):
        rate = "" if run.config.strategy == "none" else f" p={run.rate:g}"
        arms.setdefault(f"{run.config.strategy}{rate}", []).append(run)
    return arms


# --------------------------------------------------------------------------- the plan report


def corpus_text(run: RunResult, corpus: Path | None = None) -> str:
    """A run's corpus by name and checksum, never by the path of the machine that ran it.

    ``corpus``: where the corpus is now, if the study moved since the run recorded it.
    """
    from rnnreg.lm.rundir.layout import RunDir

    record = RunDir(run.path).read_corpus() or {}
    files = record.get("files", {})
    md5s = {name: info.get("md5") for name, info in files.items() if isinstance(info, dict)}
    checksums = ", ".join(f"{name} md5 {md5}" for name, md5 in sorted(md5s.items()))
    if md5s and set(md5s.values()) <= set(PTB_MD5.values()):
        return f"Penn Treebank (Mikolov's 10k-word version; {checksums})"
    spec = Path(corpus or record.get("data_dir", "")) / SPEC_FILE
    if spec.is_file():
        task = json.loads(spec.read_text(encoding="utf-8"))["task"]
        return (f"the recall corpus (distances {task['distances']}, {task['symbols']} keys, "
                f"{task['fillers']} fillers, seed {task['seed']}; {checksums})")
    return f"{Path(record.get('data_dir', 'corpus')).name} ({checksums})"


def write_plan_report(out: str | Path, write_regime: Callable[..., Path],
                      data_dir: str | Path | None = None) -> Path:
    """Write every regime's report (``write_regime``), then ``out/report.md`` and .html over
    them: the claims table first, the memory figures, and what each regime trained.

    ``data_dir`` is the text regimes' corpus (default: the recorded one); a memory regime's
    corpus is the one inside the study, rewritten from its ``recall.json`` when absent.
    """
    study = StudyDir(out)
    record = study.read_record()
    regime_reports = {}
    for name in record["regimes"]:
        regime = study.regime(name)
        if regime.has_runs():
            regime_reports[name] = write_regime(
                regime.path, data_dir=_corpus_dir(regime) if regime.has_recall_corpus()
                else data_dir)
    evidence, recalls = read_evidence(study.path)
    blocks = [Heading(_TITLE, 1), Paragraph(
        f"The study plan '{record['plan']}': {len(record['regimes'])} regimes, each built so "
        "that a claim's premise holds there, each an ordinary study with its own report.")]
    blocks += _claims_table(evaluate(CLAIMS, evidence), evidence)
    blocks += _memory_blocks(study, evidence, recalls)
    blocks += [Heading("The regimes")]
    for name, runs in evidence.runs.items():
        blocks.append(Paragraph(_regime_text(name, runs, regime_reports.get(name), study)))
    document = Document(_TITLE, tuple(blocks))
    return study.write_report(render_markdown(document), render_html(document, study.path))


def _regime_text(name: str, runs: Sequence[RunResult], report: Path | None,
                 study: StudyDir) -> str:
    finished = [r for r in runs if r.final is not None]
    if not runs:
        return f"{name}: no run yet."
    config = runs[0].config
    sizes = (f"{len(config.sizes)} layer{'s' if len(config.sizes) > 1 else ''} of "
             + ", ".join(dict.fromkeys(str(size) for size in config.sizes)))
    data = (f"the first {config.train_tokens:,} training tokens" if config.train_tokens
            else "the whole training split")
    vocab = f", the {config.max_vocab:,} most frequent words" if config.max_vocab else ""
    scored = (f"valid and test scored on their first {config.eval_tokens:,} tokens"
              if config.eval_tokens else "valid and test scored whole")
    where = f" Full report: {study.relative(report).as_posix()}." if report else ""
    corpus = corpus_text(runs[0], _corpus_dir(study.regime(name)))
    return (f"{name}: {len(runs)} runs ({len(finished)} finished) on {corpus}; "
            f"{sizes} units, {config.epochs} epochs on {data}{vocab}, batch "
            f"{config.batch_size}, bptt {config.bptt}, lr {config.lr:g} decayed by "
            f"{config.lr_decay:g} after epoch {config.decay_after}; {scored}.{where}")
