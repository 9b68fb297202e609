"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals 2018, "Dynamic Evaluation of Neural
Sequence Models"): the model keeps adapting to the text it has just scored.

The split is scored as one stream (batch 1) in segments of ``segment`` tokens, in order: each
segment is scored with the current weights, and only then is a gradient step taken on that
segment's loss (its mean negative log-likelihood per token), so no token is ever predicted by
weights that have seen it. The hidden state is carried across segments, as in static scoring.
Two updates, from section 4 of the paper, with theta_g the trained weights:

- ``sgd``: theta <- theta - lr * grad + decay * (theta_g - theta)
  (plain SGD, eq. 4; with ``decay`` > 0 the decay to the global prior of section 4.2);
- ``rms``: theta <- theta - lr * grad / (sqrt(MS_g) + epsilon)
  + decay * RMS_norm * (theta_g - theta), the "RMS with a global decay prior" update, where
  MS_g is the mean squared gradient collected on training data (:func:`gradient_statistics`)
  and RMS_norm = sqrt(MS_g) / avg(sqrt(MS_g)), clipped at 1 / decay so that no weight's decay
  overshoots theta_g. avg is the mean over the parameter tensors of each tensor's mean, the
  normalisation of the authors' reference implementation.

The scored model is a copy: the caller's model, and so the run's weights on disk, are never
changed. Dropout is off throughout (the model is in eval mode), as in the paper. The step size
and decay are chosen on the validation split by :func:`tune_dynamic` over :data:`GRIDS`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rnnreg.errors import RnnregError
from rnnreg.lm.corpus.batches import batchify, windows
from rnnreg.lm.evaluation import Score, target_log_probs
from rnnreg.lm.model import LanguageModel, ModelOutput, detach_state

__all__ = ["DEFAULT_EPSILON", "DEFAULT_SEGMENT", "DEFAULT_STAT_WINDOWS", "DEFAULT_TUNE_TOKENS",
           "GRIDS", "METHODS",
           "STAT_BATCH", "DynamicSettings", "GradientStatistics", "Tuning",
           "gradient_statistics", "score_dynamic", "tune_dynamic"]

METHODS = ("sgd", "rms")

# The grids tune_dynamic searches, for segments of 5 tokens; both axes are scaled by
# segment / 5 for other lengths, as in the authors' code (a segment's loss is a mean, so a
# longer segment takes proportionally fewer steps). The rms grid spans the authors' grid for
# AWD-LSTM (lr 3e-5..1e-4, decay 0.001..0.005) a step to either side, since rnnreg's CPU-trained
# models are smaller and shorter trained (the choices made for PTB: results/budget-sweep). The
# sgd grid spans the step sizes at which one step on a 5-token mean loss moves a trained
# model's predictions noticeably without diverging. tune_dynamic stops a point once it is
# beaten, so a diverging point costs a few segments; it reports every point.
GRIDS = {
    "sgd": {"lr": (0.03, 0.1, 0.3, 1.0), "decay": (0.0, 0.01)},
    "rms": {"lr": (1e-5, 3e-5, 1e-4, 3e-4), "decay": (0.001, 0.003, 0.01)},
}
# The authors' defaults: segments of 5 tokens, epsilon 2e-5, statistics in batches of 100.
DEFAULT_SEGMENT = 5
DEFAULT_EPSILON = 2e-5
STAT_BATCH = 100
DEFAULT_STAT_WINDOWS = 0  # the whole training split, as Krause et al.
# Tuning scores the validation text once per grid point: on its first 30,000 tokens by default,
# the authors' own fast grid search (their --gridfast), since on a CPU each pass is costly.
DEFAULT_TUNE_TOKENS = 30_000


@dataclass(frozen=True)
class DynamicSettings:
    """One dynamic evaluation: the update, its step size and decay, the segment length."""

    method: str                      # "sgd" or "rms"
    lr: float                        # the step size eta
    decay: float = 0.0               # lambda, the pull back toward the trained weights
    segment: int = DEFAULT_SEGMENT   # tokens scored before each step
    epsilon: float = DEFAULT_EPSILON  # rms only: keeps the step finite where MS_g is ~0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RnnregError(f"dynamic evaluation method must be one of {', '.join(METHODS)}; "
                              f"got {self.method!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RnnregError(f"dynamic evaluation step size (lr) must be > 0, got {self.lr}")
        if not 0 <= self.decay < 1:
            raise RnnregError(f"dynamic evaluation decay must be in [0, 1), got {self.decay}: "
                              "1 would undo every step at once")
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) \
                or self.segment < 1:
            raise RnnregError(f"dynamic evaluation segment must be a positive number of "
                              f"tokens, got {self.segment!r}")
        if not self.epsilon > 0:
            raise RnnregError(f"dynamic evaluation epsilon must be > 0, got {self.epsilon}")


@dataclass(frozen=True)
class GradientStatistics:
    """sqrt(MS_g) per parameter (names of ``named_parameters``), over ``windows`` windows of
    ``STAT_BATCH`` x ``segment`` training tokens (``tokens`` in all)."""

    rms: dict[str, Tensor]
    windows: int
    tokens: int


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune_dynamic` chose, and every grid point's perplexity on ``tokens``
    validation tokens (``grid``: (lr, decay, perplexity) in the order tried; perplexity None
    for a point stopped once it could no longer win)."""

    settings: DynamicSettings
    perplexity: float
    tokens: int
    grid: tuple[tuple[float, float, float | None], ...]


def _segment_loss(out: ModelOutput, targets: Tensor) -> Tensor:
    """Summed NLL of a segment's targets (the static scorer's log-probabilities)."""
    return -target_log_probs(out, targets).sum()


def gradient_statistics(model: LanguageModel, train_ids: Tensor, *,
                        segment: int = DEFAULT_SEGMENT, windows_max: int = DEFAULT_STAT_WINDOWS,
                        progress: bool = False) -> GradientStatistics:
    """Mean squared gradient of the per-token loss on training data, for the ``rms`` update.

    Over windows of ``STAT_BATCH`` streams x ``segment`` tokens: all of them by default (the
    whole training split, as Krause et al.), or the first ``windows_max``, which bounds the
    cost (the streams start at ``STAT_BATCH`` places spread over the corpus). A sample can
    miss a weight entirely (the embedding row of a word it never holds, an adaptive-softmax
    cluster it never reaches); such a weight's sqrt(MS) would be 0 and its step lr / epsilon
    times its gradient, large enough to wreck the model the first time the word appears. So a
    zero is replaced by the mean of the nonzero entries of its tensor, the magnitude of the
    weights like it that the sample did reach, and a tensor it never reached at all takes the
    average over the tensors it did reach of their means. The model is not changed; it runs
    in eval mode.
    """
    if windows_max < 0:
        raise RnnregError(f"gradient statistics need windows_max >= 0 (0 = the whole "
                          f"training split), got {windows_max}")
    worker = _copy_for_adapting(model)
    params = dict(worker.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    device = next(worker.parameters()).device
    streams = batchify(train_ids.to(device), min(STAT_BATCH, max(1, train_ids.numel() // 2)))
    if streams.size(0) < 2:
        raise RnnregError("the training split is too short for gradient statistics")
    state, count, tokens = None, 0, 0
    available = math.ceil((streams.size(0) - 1) / segment)
    bar = tqdm(total=min(windows_max or available, available), disable=not progress,
               unit="window", leave=False, desc="gradient statistics")
    for inputs, targets in windows(streams, segment):
        out = worker(inputs, state, targets=targets)
        state = detach_state(out.state)
        loss = _segment_loss(out, targets) / targets.numel()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                squares[name].addcmul_(grad, grad)
        count, tokens = count + 1, tokens + targets.numel()
        bar.update(1)
        if count == windows_max:
            break
    bar.close()
    return GradientStatistics(_fill_zeros({name: (s / count).sqrt_()
                                           for name, s in squares.items()}), count, tokens)


def _fill_zeros(rms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor's zeros replaced by the mean of its nonzero entries; a tensor of zeros
    filled with the mean over the other tensors of their means (see gradient_statistics)."""
    filled = {}
    for name, values in rms.items():
        reached = values > 0
        filled[name] = (values if not reached.any() else
                        torch.where(reached, values, values[reached].mean()))
    means = [float(values.mean()) for values in filled.values() if bool((values > 0).any())]
    if means:
        average = sum(means) / len(means)
        for name, values in filled.items():
            if not bool((values > 0).any()):
                filled[name] = torch.full_like(values, average)
    return filled


def _copy_for_adapting(model: LanguageModel) -> LanguageModel:
    """A private copy in eval mode (deepcopy keeps tied weights tied), needing gradients."""
    worker = copy.deepcopy(model).eval()
    for p in worker.parameters():
        p.requires_grad_(True)
    return worker


class _Update:
    """The per-segment update of :class:`DynamicSettings` on one model's parameters.

    theta + pull * (theta_g - theta) - step * grad is applied as
    theta * (1 - pull) + pull * theta_g - step * grad, in place, with ``1 - pull`` and
    ``pull * theta_g`` precomputed: three passes over the weights per segment and no new
    tensors, since that pass over every weight, not the forward and backward on a few tokens,
    is most of a segment's cost for a model with a large embedding.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], settings: DynamicSettings,
                 stats: GradientStatistics | None) -> None:
        self.params = list(params.values())
        lr, decay = settings.lr, settings.decay
        steps: list[Tensor | float] = [lr] * len(self.params)
        pulls: list[Tensor | float] = [decay] * len(self.params)
        if settings.method == "rms":
            if stats is None:
                raise RnnregError("the rms update needs gradient statistics from training data "
                                  "(gradient_statistics)")
            missing = sorted(set(params) - set(stats.rms))
            if missing:
                raise RnnregError(f"gradient statistics lack parameter(s) {missing}: collect "
                                  "them on this model")
            rms = [stats.rms[name] for name in params]
            mean = sum(float(r.mean()) for r in rms) / len(rms)   # avg(sqrt(MS_g))
            steps = [lr / (r + settings.epsilon) for r in rms]
            if decay > 0 and mean > 0:
                pulls = [decay * (r / mean).clamp(max=1 / decay) for r in rms]
        self.steps = steps
        self.keeps = [1 - pull for pull in pulls] if decay > 0 else None
        self.anchors = ([pull * p.detach() for pull, p in zip(pulls, self.params)]
                        if decay > 0 else None)

    @torch.no_grad()
    def __call__(self, grads: Sequence[Tensor | None]) -> None:
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            if self.keeps is not None:
                p.mul_(self.keeps[i]).add_(self.anchors[i])
            if grad is None:
                continue
            if isinstance(self.steps[i], Tensor):
                p.addcmul_(self.steps[i], grad, value=-1)
            else:
                p.add_(grad, alpha=-self.steps[i])


def score_dynamic(model: LanguageModel, ids: Tensor, settings: DynamicSettings,
                  stats: GradientStatistics | None = None, *, progress: bool = False,
                  on_segment: Callable[[Tensor, LanguageModel], None] | None = None) -> Score:
    """Perplexity of ``ids`` (1-D, one stream) under dynamic evaluation.

    Every token but the first is scored once, before any step on it; the count of tokens is
    the static scorer's. ``stats`` is required for ``rms``. ``on_segment`` (tests, progress
    hooks) is called after each segment's update with that segment's summed NLL (a scalar
    tensor) and the adapted copy, which it must not modify. ``model`` is left as it was.
    """
    score = _adapt(model, ids, settings, stats, progress=progress, on_segment=on_segment)
    assert score is not None  # no bound, so never stopped early
    return score


def _adapt(model: LanguageModel, ids: Tensor, settings: DynamicSettings,
           stats: GradientStatistics | None, *, progress: bool = False,
           on_segment: Callable[[Tensor, LanguageModel], None] | None = None,
           stop_above: float | None = None) -> Score | None:
    """:func:`score_dynamic`, stopped (returning None) as soon as the summed NLL so far is
    above ``stop_above`` or not finite. The sum only grows, so a stopped run could not have
    ended at or below ``stop_above``: tuning uses it to drop a grid point exactly once it is
    beaten, and a diverging one within a few segments."""
    worker = _copy_for_adapting(model)
    params = dict(worker.named_parameters())
    update = _Update(params, settings, stats)
    device = next(worker.parameters()).device
    stream = batchify(ids.to(device), 1)
    if stream.size(0) < 2:
        raise RnnregError("dynamic evaluation needs at least two tokens")
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    start = time.perf_counter()
    bar = tqdm(total=stream.size(0) - 1, disable=not progress, unit="tok", leave=False)
    for inputs, targets in windows(stream, settings.segment):
        out = worker(inputs, state, targets=targets)
        state = detach_state(out.state)
        nll = _segment_loss(out, targets)
        total += nll.detach().double()
        if stop_above is not None and not _within(float(total), stop_above):
            bar.close()
            return None
        grads = torch.autograd.grad(nll / targets.numel(), list(params.values()),
                                    allow_unused=True)
        update(grads)
        if on_segment is not None:
            on_segment(nll.detach(), worker)
        bar.update(inputs.size(0))
    bar.close()
    return Score(float(total), stream.size(0) - 1, time.perf_counter() - start)


def _within(nll: float, bound: float) -> bool:
    return math.isfinite(nll) and nll <= bound


def tune_dynamic(model: LanguageModel, valid_ids: Tensor, method: str,
                 stats: GradientStatistics | None = None, *, segment: int = DEFAULT_SEGMENT,
                 tokens: int = DEFAULT_TUNE_TOKENS,
                 grid: dict[str, Sequence[float]] | None = None,
                 progress: bool = False) -> Tuning:
    """Choose the step size and decay on validation text: every point of ``grid`` (default
    :data:`GRIDS` for ``method``, scaled by ``segment / 5``) scores the first ``tokens`` of
    ``valid_ids`` (0: all of them), each from the trained weights; the lowest perplexity wins
    (the first tried on a tie). A point is stopped as soon as its summed NLL exceeds the best
    complete point's (it cannot win any more) or stops being finite; its perplexity is then
    None in ``grid``, and a grid whose every point diverges is refused.
    """
    if tokens < 0:
        raise RnnregError(f"tuning tokens must be >= 0 (0 = the whole split), got {tokens}")
    if method not in METHODS:
        raise RnnregError(f"dynamic evaluation method must be one of {', '.join(METHODS)}; "
                          f"got {method!r}")
    ids = valid_ids[:tokens] if tokens else valid_ids
    if grid is None:
        scale = segment / DEFAULT_SEGMENT
        grid = {axis: tuple(v * scale for v in values) for axis, values in GRIDS[method].items()}
    tried, best = [], None
    for decay in grid["decay"]:
        for lr in grid["lr"]:
            settings = DynamicSettings(method, lr, decay, segment)
            score = _adapt(model, ids, settings, stats, progress=progress,
                           stop_above=math.inf if best is None else best[1].nll)
            tried.append((lr, decay, None if score is None else score.perplexity))
            if score is not None and (best is None or score.nll < best[1].nll):
                best = (settings, score)
    if best is None:
        raise RnnregError(f"every {method} grid point diverged on the validation text (its "
                          "loss stopped being finite): pass a grid of smaller step sizes, or "
                          "choose the settings yourself")
    return Tuning(best[0], best[1].perplexity, ids.numel() - 1, tuple(tried))
