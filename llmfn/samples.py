"""Text in, text out: prompts completed by `generate`, and the built-in corpus's fact test."""

import jax
import numpy as np

from . import corpus
from .config import Config
from .generate import generate
from .model import Params


def complete(params: Params, cfg: Config, tokenizer, prompts: list[str], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The text each prompt is continued with: up to max_new_tokens tokens (greedy at temperature 0).

    Prompts of different lengths are right-padded into one (B, P) batch with their lengths.
    """
    ids = [tokenizer.encode(p) for p in prompts]
    lengths = np.array([len(i) for i in ids], np.int32)  # (B,)
    padded = np.zeros((len(ids), lengths.max()), np.int32)  # (B, P)
    for row, i in enumerate(ids):
        padded[row, : len(i)] = i
    new = min(max_new_tokens, cfg.context - padded.shape[1])
    tokens, valid = generate(params, padded, jax.random.key(seed), cfg, new, temperature=temperature,
                             prompt_lengths=lengths)  # (B, P + N) ×2
    tokens, valid = np.asarray(tokens), np.asarray(valid)
    return [tokenizer.decode(t[n:][v[n:]]) for t, v, n in zip(tokens, valid, lengths)]


def fact_recall(params: Params, cfg: Config, tokenizer) -> tuple[float, dict[str, str]]:
    """Greedy completion of "the capital of X is" for every country of `corpus.FACTS`.

    Returns (fraction answered exactly " <capital>.", {country: wrong first line}).
    """
    countries = list(corpus.FACTS)
    texts = complete(params, cfg, tokenizer, ["\n" + corpus.fact_prompt(c) for c in countries], 12)
    wrong = {c: t.split("\n")[0] for c, t in zip(countries, texts) if not t.startswith(f" {corpus.FACTS[c]}.\n")}
    return 1 - len(wrong) / len(countries), wrong
