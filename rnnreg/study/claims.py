"""The tutorial's claims as data, and their verdicts computed from a study's runs.

A claim is a comparison with a direction: arm A beats arm B (or is at least as good, or no
better) on one measure, in one regime. Arms are (cell, strategy, rate) cells of the grid. A
seed fixes the initialization and the data order, so the two arms are compared seed by seed:
the verdict comes from the mean of the paired differences and its 95% Student-t interval,
never from a typed conclusion, so other runs give other verdicts. A claim whose runs the study
does not hold is "not tested".

Verdicts, with ``d`` the paired difference oriented so that positive favours the claim's first
arm and ``[lo, hi]`` its interval:

- ``better``: supported when ``lo > 0``, contradicted when ``hi < 0``;
- ``at least as good``: supported when ``lo > -margin``, contradicted when ``hi < -margin``;
- ``no better``: supported when ``hi < margin``, contradicted when ``lo > margin``;

inconclusive otherwise, or with fewer than two paired seeds; "premise not met" when the regime's
runs show that what the claim presupposes did not happen (the model without dropout did not
overfit, or an arm never learnt the memory task), whatever the comparison says. The margin is
what counts as a negligible difference: 2% of the second arm's mean perplexity, 5 accuracy
points. The spread claim compares the two arms' seed variances with the F interval of their
ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rnnreg.study.results import RunResult

__all__ = ["CLAIMS", "Arm", "Claim", "Evidence", "Measure", "Verdict", "evaluate", "f_quantile",
           "measure_runs", "premise_failure", "runs_text", "seeds_to_decide", "t_quantile"]

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED, NOT_MET = (
    "supported", "contradicted", "inconclusive", "not tested", "premise not met")
# A claim's premise, checked in its regime before its comparison means anything: the model
# overfits without dropout (its valid perplexity rose after its minimum in most seeds), or both
# arms learnt the memory task at all (mean recall at the shortest N of at least LEARNT_RECALL).
OVERFITS, LEARNT = "no dropout overfits", "the task is learnt"
LEARNT_RECALL = 0.5
BETTER, AT_LEAST, NO_BETTER, STEADIER = "better", "at least as good", "no better", "steadier"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Arm:
    """One side of a comparison: the runs of one grid cell (all its seeds)."""

    strategy: str
    rate: float
    cell: str = "lstm"

    @property
    def label(self) -> str:
        rate = "" if self.strategy == "none" else f" p={self.rate:g}"
        return f"{self.cell} {self.strategy}{rate}"

    def holds(self, run: RunResult) -> bool:
        return (run.config.cell == self.cell and run.config.strategy == self.strategy
                and math.isclose(run.rate, self.rate))


@dataclass(frozen=True)
class Measure:
    """A number per run, which direction is better, and what a negligible difference is."""

    name: str
    lower_is_better: bool
    margin: Callable[[float], float]  # of the second arm's mean
    points: bool = False  # a share, shown in points (x 100)


TEST_PPL = Measure("test perplexity", True, lambda reference: 0.02 * reference)
LONGEST_RECALL = Measure("recall accuracy at the longest N", False, lambda _: 0.05, True)
RECALL_DROP = Measure("recall accuracy lost from the shortest to the longest N", True,
                      lambda _: 0.05, True)
# Not compared by a claim: shown beside the memory claims, whether the task was learnt at all.
SHORTEST_RECALL = Measure("recall accuracy at the shortest N", False, lambda _: 0.05, True)


@dataclass(frozen=True)
class Claim:
    """``first`` is ``kind`` than ``second`` on ``measure`` in ``regime``, a regime's name in
    :data:`rnnreg.study.grid.PLANS` ("text", "text-rnn", "memory", "memory-rnn")."""

    key: str
    text: str
    regime: str
    kind: str
    first: Arm
    second: Arm
    measure: Measure = TEST_PPL
    premise: str = ""  # OVERFITS, LEARNT or none

    @property
    def compared(self) -> str:
        relation = {AT_LEAST: "at least as good as", NO_BETTER: "no better than"}.get(
            self.kind, f"{self.kind} than")
        return f"{self.first.label} {relation} {self.second.label} ({self.measure.name})"


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    difference: float | None = None      # mean paired difference, positive favours `first`
    interval: tuple[float, float] | None = None
    seeds: tuple[int, ...] = ()
    runs: tuple[str, ...] = ()
    note: str = ""

    @property
    def difference_text(self) -> str:
        if self.difference is None:
            return "–"
        if self.claim.kind == STEADIER:
            low, high = self.interval
            return f"{self.difference:.2f} [{low:.2f}, {high:.2f}]"
        scale, digits = (100, 1) if self.claim.measure.points else (1, 2)
        text = f"{self.difference * scale:+.{digits}f}"
        if self.interval is not None:
            low, high = (value * scale for value in self.interval)
            text += f" [{low:+.{digits}f}, {high:+.{digits}f}]"
        return text


_HIGH, _LOW = 0.5, 0.2
CLAIMS: tuple[Claim, ...] = (
    Claim("zaremba-beats-none", "Dropout on the non-recurrent connections beats no dropout "
          "where no dropout overfits.", "text", BETTER,
          Arm("zaremba", _HIGH), Arm("none", 0.0), premise=OVERFITS),
    Claim("naive-worse", "Fresh per-step dropout on the recurrent connection as well (naive) "
          "is worse than dropout on the non-recurrent connections alone, at the same rate.",
          "text", BETTER, Arm("zaremba", _HIGH), Arm("naive", _HIGH)),
    Claim("recurrent-only-no-help", "Dropout on the recurrent connection alone does not "
          "regularize.", "text", NO_BETTER, Arm("recurrent_only", _HIGH), Arm("none", 0.0)),
    Claim("variational-vs-zaremba", "One mask per sequence (variational) is at least as good "
          "as zaremba.", "text", AT_LEAST, Arm("variational", _HIGH), Arm("zaremba", _HIGH)),
    Claim("variational-beats-naive", "One mask per sequence beats fresh per-step masks on the "
          "same connections.", "text", BETTER, Arm("variational", _HIGH), Arm("naive", _HIGH)),
    Claim("variational-steadier", "One mask per sequence is steadier: a smaller spread over "
          "seeds than zaremba.", "text", STEADIER,
          Arm("variational", _HIGH), Arm("zaremba", _HIGH)),
    *(claim for cell, regime in (("lstm", "memory"), ("rnn", "memory-rnn")) for claim in (
        Claim(f"memory-zaremba-{cell}", "Per-step dropout on the recurrent connection "
              f"destroys memory ({cell}): at the longest distance zaremba recalls more than "
              "naive.", regime, BETTER, Arm("zaremba", _HIGH, cell), Arm("naive", _HIGH, cell),
              LONGEST_RECALL, LEARNT),
        Claim(f"memory-variational-{cell}", f"At the longest distance variational recalls "
              f"more than naive ({cell}).", regime, BETTER,
              Arm("variational", _HIGH, cell), Arm("naive", _HIGH, cell), LONGEST_RECALL,
              LEARNT),
        Claim(f"memory-falls-with-n-{cell}", f"naive's recall falls with the distance while "
              f"zaremba's holds ({cell}): zaremba loses less from the shortest to the longest "
              "distance.", regime, BETTER, Arm("zaremba", _HIGH, cell),
              Arm("naive", _HIGH, cell), RECALL_DROP, LEARNT),
    )),
    Claim("high-rate", "Rates of 0.5-0.7 beat low rates for a model large enough to overfit.",
          "text", BETTER, Arm("zaremba", _HIGH), Arm("zaremba", _LOW), premise=OVERFITS),
    Claim("gru", "It holds for the GRU: zaremba beats no dropout.", "text", BETTER,
          Arm("zaremba", _HIGH, "gru"), Arm("none", 0.0, "gru"), premise=OVERFITS),
    Claim("tanh-rnn", "It holds for the plain tanh RNN the tutorial uses: zaremba beats no "
          "dropout.", "text-rnn", BETTER, Arm("zaremba", _HIGH, "rnn"), Arm("none", 0.0, "rnn"),
          premise=OVERFITS),
)


@dataclass(frozen=True)
class Evidence:
    """Per regime, its runs and a value of every measure for each finished run."""

    runs: Mapping[str, Sequence[RunResult]]
    values: Mapping[tuple[str, str, str], float] = field(default_factory=dict)
    # keyed (regime, run name, measure name)


def evaluate(claims: Sequence[Claim], evidence: Evidence) -> list[Verdict]:
    """One verdict per claim, from the runs of the claim's regime."""
    return [_verdict(claim, evidence) for claim in claims]


def _arm_values(arm: Arm, regime: str, measure: Measure,
                evidence: Evidence) -> dict[int, tuple[str, float]]:
    """seed -> (run name, value) for the finished runs of ``arm``."""
    found = {}
    for run in evidence.runs.get(regime, ()):
        value = evidence.values.get((regime, run.name, measure.name))
        if arm.holds(run) and value is not None and math.isfinite(value):
            found[run.config.seed] = (run.name, value)
    return found


def _verdict(claim: Claim, evidence: Evidence) -> Verdict:
    first = _arm_values(claim.first, claim.regime, claim.measure, evidence)
    second = _arm_values(claim.second, claim.regime, claim.measure, evidence)
    if not first or not second:
        missing = [arm.label for arm, values in ((claim.first, first), (claim.second, second))
                   if not values]
        return Verdict(claim, NOT_TESTED, note=f"no finished run of {', '.join(missing)} in "
                                               f"the {claim.regime} regime")
    if claim.kind == STEADIER:
        return _spread_verdict(claim, first, second)
    seeds = tuple(sorted(set(first) & set(second)))
    runs = tuple(name for seed in seeds for name in (first[seed][0], second[seed][0]))
    sign = -1.0 if claim.measure.lower_is_better else 1.0
    differences = [sign * (first[seed][1] - second[seed][1]) for seed in seeds]
    if not differences:
        return Verdict(claim, NOT_TESTED, note="the two arms share no seed")
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return Verdict(claim, INCONCLUSIVE, mean, None, seeds, runs,
                       "one paired seed: no interval")
    half = (t_quantile(0.5 + CONFIDENCE / 2, len(differences) - 1)
            * statistics.stdev(differences) / math.sqrt(len(differences)))
    low, high = mean - half, mean + half
    margin = claim.measure.margin(statistics.fmean(second[s][1] for s in seeds))
    verdict = _decide(claim.kind, low, high, margin)
    note = ""
    if verdict == INCONCLUSIVE and claim.kind == BETTER:
        note = seeds_to_decide(mean, statistics.stdev(differences))
    failed = premise_failure(claim, evidence)
    if failed:
        verdict, note = NOT_MET, f"{failed}: the comparison (would be {verdict}) tests nothing"
    return Verdict(claim, verdict, mean, (low, high), seeds, runs, note)


def premise_failure(claim: Claim, evidence: Evidence) -> str:
    """Why the claim's premise does not hold in its regime's runs ("" when it holds)."""
    if claim.premise == OVERFITS:
        none = Arm("none", 0.0, claim.first.cell)
        runs = [r for r in evidence.runs.get(claim.regime, ()) if none.holds(r) and r.epochs]
        rose = sum(min(e["valid_ppl"] for e in r.epochs) < r.epochs[-1]["valid_ppl"]
                   for r in runs)
        if 2 * rose <= len(runs):
            return (f"{none.label} did not overfit (valid perplexity rose after its minimum "
                    f"in {rose} of {len(runs)} seeds)")
    if claim.premise == LEARNT:
        for arm in (claim.first, claim.second):
            recall = _arm_values(arm, claim.regime, SHORTEST_RECALL, evidence)
            mean = statistics.fmean(v for _, v in recall.values()) if recall else 0.0
            if mean < LEARNT_RECALL:
                return (f"{arm.label} did not learn the task (recall {mean:.0%} at the "
                        f"shortest N, below {LEARNT_RECALL:.0%})")
    return ""


def seeds_to_decide(mean: float, spread: float, most: int = 100) -> str:
    """How many paired seeds would exclude zero if the mean and spread seen so far held."""
    if mean == 0 or spread == 0:
        return "no difference between the arms to resolve"
    for n in range(2, most + 1):
        if t_quantile(0.5 + CONFIDENCE / 2, n - 1) * spread / math.sqrt(n) < abs(mean):
            return f"at this mean and spread about {n} seeds would decide it"
    return f"at this mean and spread more than {most} seeds would be needed"


def _decide(kind: str, low: float, high: float, margin: float) -> str:
    if kind == BETTER:
        supported, contradicted = low > 0, high < 0
    elif kind == AT_LEAST:
        supported, contradicted = low > -margin, high < -margin
    elif kind == NO_BETTER:
        supported, contradicted = high < margin, low > margin
    else:
        raise ValueError(f"unknown claim kind {kind!r}")
    return SUPPORTED if supported else CONTRADICTED if contradicted else INCONCLUSIVE


def _spread_verdict(claim: Claim, first: dict, second: dict) -> Verdict:
    """The ratio of the second arm's seed variance to the first's, with its F interval."""
    a = [value for _, value in first.values()]
    b = [value for _, value in second.values()]
    runs = tuple(name for name, _ in (*first.values(), *second.values()))
    seeds = tuple(sorted(set(first) | set(second)))
    if len(a) < 2 or len(b) < 2:
        return Verdict(claim, INCONCLUSIVE, None, None, seeds, runs, "a spread needs two seeds")
    var_a, var_b = statistics.variance(a), statistics.variance(b)
    if var_a == 0:
        return Verdict(claim, INCONCLUSIVE, None, None, seeds, runs, "no spread at all")
    ratio = var_b / var_a
    tail = (1 - CONFIDENCE) / 2
    # var_b / var_a over the true ratio is F(n_b - 1, n_a - 1) distributed.
    low = ratio / f_quantile(1 - tail, len(b) - 1, len(a) - 1)
    high = ratio / f_quantile(tail, len(b) - 1, len(a) - 1)
    verdict = SUPPORTED if low > 1 else CONTRADICTED if high < 1 else INCONCLUSIVE
    return Verdict(claim, verdict, ratio, (low, high), seeds, runs,
                   "variance ratio, second arm over first")


# --------------------------------------------------------------------------- distributions


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes, 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def _t_cdf(t: float, df: int) -> float:
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def _f_cdf(x: float, d1: int, d2: int) -> float:
    return 0.0 if x <= 0 else _betainc(d1 / 2, d2 / 2, d1 * x / (d1 * x + d2))


def _solve(cdf: Callable[[float], float], q: float, low: float, high: float) -> float:
    """The x with cdf(x) = q, by bisection on a bracket widened until it holds q."""
    while cdf(high) < q:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < q else (low, middle)
    return (low + high) / 2


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with ``df`` degrees of freedom."""
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_quantile(1 - q, df)
    return _solve(lambda x: _t_cdf(x, df), q, 0.0, 10.0)


def f_quantile(q: float, d1: int, d2: int) -> float:
    """The q-quantile of the F distribution with (d1, d2) degrees of freedom."""
    return _solve(lambda x: _f_cdf(x, d1, d2), q, 0.0, 10.0)


# --------------------------------------------------------------------------- evidence


def runs_text(verdict: Verdict, limit: int = 6) -> str:
    """The runs behind a verdict, named as in the study's directories."""
    names = list(verdict.runs)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def measure_runs(regime: str, runs: Sequence[RunResult],
                 recall: Callable[[RunResult], Mapping[int, float]] | None = None
                 ) -> dict[tuple[str, str, str], float]:
    """Every measure the claims use, for every finished run of one regime.

    ``recall`` gives a memory run's accuracy by distance N (None: the regime has no recall
    corpus, and the recall measures are absent).
    """
    values: dict[tuple[str, str, str], float] = {}
    for run in runs:
        if run.final is None:
            continue
        if run.final.get("test_ppl") is not None:
            values[(regime, run.name, TEST_PPL.name)] = float(run.final["test_ppl"])
        if recall is not None:
            accuracy = recall(run)
            if accuracy:
                shortest, longest = min(accuracy), max(accuracy)
                values[(regime, run.name, LONGEST_RECALL.name)] = accuracy[longest]
                values[(regime, run.name, SHORTEST_RECALL.name)] = accuracy[shortest]
                values[(regime, run.name, RECALL_DROP.name)] = (accuracy[shortest]
                                                               - accuracy[longest])
    return values
