"""Sampling text from a trained language model."""

from __future__ import annotations

import torch

from rnnreg.lm.corpus.vocab import EOS, Vocabulary, tokenize
from rnnreg.lm.model import LanguageModel

__all__ = ["sample_text"]


@torch.no_grad()
def sample_text(model: LanguageModel, vocab: Vocabulary, prompt: str, *, words: int,
                temperature: float = 1.0, level: str = "word") -> str:
    """Condition on ``prompt`` (may be empty: then on an end of sentence) and sample ``words``.

    Sampling from softmax(logits / temperature): below 1 sharpens towards likely words, above
    1 flattens towards the vocabulary's spread. An adaptive softmax's "logits" are its exact
    log-probabilities over the whole vocabulary, so the same formula samples p^(1/temperature),
    renormalized; at temperature 1, exactly its distribution.
    """
    model.eval()
    device = next(model.parameters()).device
    context = tokenize(prompt, level)[:-1] if prompt.strip() else [EOS]
    ids = vocab.encode(context).to(device).view(-1, 1)
    out = model(ids)
    state, logits = out.state, out.logits[-1, 0]
    sampled = []
    for _ in range(words):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        word = torch.multinomial(probs, 1)
        sampled.append(int(word))
        out = model(word.view(1, 1), state)
        state, logits = out.state, out.logits[-1, 0]
    tokens = vocab.decode(sampled)
    joiner = "" if level == "char" else " "
    text = joiner.join("\n" if t == EOS else t for t in tokens)
    prefix = prompt.strip() + joiner if prompt.strip() else ""
    return (prefix + text).replace(" \n ", "\n").replace("_", " " if level == "char" else "_")
