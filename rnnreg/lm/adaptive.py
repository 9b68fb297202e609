"""The adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs").

Word ids are ordered by descending frequency (:meth:`rnnreg.lm.corpus.vocab.Vocabulary.from_tokens`;
a run's ``vocab.json`` lists the words in that id order, so a reloaded run keeps its clusters),
so ``cutoffs`` split the vocabulary into contiguous ranges: the ``cutoffs[0]`` most frequent
words form the *head* together with one entry per *cluster* of rarer words; cluster ``i`` holds
the words ``[cutoffs[i], cutoffs[i+1])`` and reads the hidden state through a projection to
``in_features // div_value ** (i + 1)`` dimensions (section 4.1 of the paper: rarer words get
less capacity). A word of cluster ``i`` has

    log p(w | h) = log p_head(cluster i | h) + log p_cluster_i(w | h)

and a head word ``log p_head(w | h)``. That is an exact, normalized distribution over the whole
vocabulary, so its perplexity is a real perplexity. :meth:`AdaptiveSoftmax.target_log_probs`
evaluates it for the given targets only (each cluster sees just the rows whose target it holds:
the fast training path); :meth:`AdaptiveSoftmax.log_probs` forms all V log-probabilities
(sampling, and anything that needs the whole distribution). Both compute the log-softmaxes in
float32 (float64 for a float64 model) whatever the autocast precision of the linear maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnreg.errors import RnnregError
from rnnreg.nn.functional import is_positive_int

__all__ = ["AdaptiveSoftmax", "check_cutoffs", "default_cutoffs"]

# The default head and first cluster end at the 2,000th and 10,000th most frequent words:
# Grave et al. (2017, section 5) put about 2k words in the head for 10k-100k vocabularies, where
# they cover most running text (Zipf's law), and a second cluster boundary at 10k keeps the
# rarest words, most of a large vocabulary, at the smallest projection.
_DEFAULT_BOUNDARIES = (2000, 10000)


def default_cutoffs(vocab_size: int) -> tuple[int, ...]:
    """The cutoffs used when none are given: the boundaries 2,000 and 10,000 below ``vocab_size``.

    A vocabulary of at most 2,000 words has no such boundary; it gets one cluster of its least
    frequent four fifths (such a small vocabulary gains nothing from the adaptive softmax, but it
    should still build, e.g. for tests).
    """
    cutoffs = tuple(c for c in _DEFAULT_BOUNDARIES if c < vocab_size)
    return cutoffs or (max(1, vocab_size // 5),)


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    """Cutoffs as a tuple, or one ValueError saying what is wrong with them."""
    values = tuple(cutoffs)
    if (not values or not all(is_positive_int(c) for c in values)
            or list(values) != sorted(set(values)) or values[-1] >= vocab_size):
        raise RnnregError(f"adaptive_cutoffs must be strictly increasing integers in "
                          f"[1, {vocab_size - 1}] for a vocabulary of {vocab_size} words "
                          f"(the head holds the ids below the first cutoff); got {list(values)}")
    return values


class AdaptiveSoftmax(nn.Module):
    """An exact adaptive softmax over ``vocab_size`` frequency-ordered words; see the module.

    Parameters: ``head`` (``in_features -> cutoffs[0] + clusters``, with bias like the full
    decoder) and per cluster ``tails[i]``: a projection without bias followed by the cluster's
    word scores with bias.

    Why not a thin layer over ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (same factorization):

    * float32: torch's module calls ``log_softmax`` on its linear maps' output as it comes, so
      the normalization runs in whatever precision autocast gave those maps; here it runs in
      float32 at least (:func:`_log_softmax`).
    * DistributedDataParallel: torch's forward skips a cluster that holds none of the batch's
      targets, leaving its parameters out of that step's graph, which DDP accepts only with
      ``find_unused_parameters=True`` (an extra traversal of the graph every step); here every
      tail runs every call, on zero rows if need be.
    * Parameters: torch's cluster word scores have no bias and its modules are named ``tail``,
      so the same model would have other parameters and ``state_dict`` keys, and existing run
      directories' checkpoints would not load.
    """

    def __init__(self, in_features: int, vocab_size: int, cutoffs: Sequence[int] | None = None,
                 div_value: float = 4.0) -> None:
        super().__init__()
        if not div_value >= 1:
            raise RnnregError(f"adaptive_div_value must be >= 1, got {div_value}")
        cutoffs = default_cutoffs(vocab_size) if cutoffs is None else cutoffs
        self.cutoffs = check_cutoffs(cutoffs, vocab_size)
        self.vocab_size = vocab_size
        self.div_value = float(div_value)
        bounds = (*self.cutoffs, vocab_size)
        self.head = nn.Linear(in_features, self.cutoffs[0] + len(self.cutoffs))
        tails = []
        for i, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
            width = int(in_features // self.div_value ** (i + 1))
            if width < 1:
                raise RnnregError(f"adaptive_div_value {div_value} leaves cluster {i + 1} of "
                                  f"{in_features} features no dimension: lower it or use fewer "
                                  "cutoffs")
            tails.append(nn.Sequential(nn.Linear(in_features, width, bias=False),
                                       nn.Linear(width, high - low)))
        self.tails = nn.ModuleList(tails)

    @property
    def shortlist(self) -> int:
        """How many of the most frequent words the head predicts directly."""
        return self.cutoffs[0]

    def log_probs(self, x: Tensor) -> Tensor:
        """All log-probabilities, ``(..., in_features) -> (..., vocab_size)``."""
        head = _log_softmax(self.head(x))
        parts = [head[..., :self.shortlist]]
        for i, tail in enumerate(self.tails):
            cluster = head[..., self.shortlist + i, None]
            parts.append(cluster + _log_softmax(tail(x)))
        return torch.cat(parts, -1)

    def target_log_probs(self, x: Tensor, targets: Tensor) -> Tensor:
        """log p(target), shaped like ``targets``; ``x`` is ``(*targets.shape, F)``.

        Each cluster's projection and scores run only on the rows whose target it holds. Every
        tail still runs every call, on zero rows if need be, so every parameter is in the graph
        (zero gradients) and DistributedDataParallel needs no ``find_unused_parameters``.
        """
        flat = x.reshape(-1, x.size(-1))
        wanted = targets.reshape(-1)
        head = _log_softmax(self.head(flat))
        # A head word reads its own entry; a rare word its cluster's entry in the head.
        bounds = torch.tensor(self.cutoffs, device=wanted.device)
        cluster = torch.bucketize(wanted, bounds, right=True)       # 0 = head, i + 1 = tail i
        entry = torch.where(cluster == 0, wanted, self.shortlist + cluster - 1)
        result = head.gather(1, entry.unsqueeze(1)).squeeze(1)
        bounds = (*self.cutoffs, self.vocab_size)
        for i, tail in enumerate(self.tails):
            rows = (cluster == i + 1).nonzero().squeeze(1)
            scores = _log_softmax(tail(flat.index_select(0, rows)))
            within = (wanted.index_select(0, rows) - bounds[i]).unsqueeze(1)
            result = result.index_add(0, rows, scores.gather(1, within).squeeze(1))
        return result.view(targets.shape)

    def extra_repr(self) -> str:
        return f"cutoffs={self.cutoffs}, vocab_size={self.vocab_size}, div_value={self.div_value}"


def _log_softmax(scores: Tensor) -> Tensor:
    """In float32 at least: bfloat16 scores (autocast) are too coarse to normalize over."""
    return F.log_softmax(scores if scores.dtype == torch.float64 else scores.float(), -1)
