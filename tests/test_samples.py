"""Text completion against an uncached greedy recompute, and the fact test's scoring."""

import jax
import numpy as np

import llmfn
from llmfn import corpus, samples
from llmfn.tokenizer import make_tokenizer

CFG = llmfn.Config(vocab_size=256, context=32, n_layers=1, d_model=32, n_heads=2)


def test_greedy_completion_equals_argmax_of_the_full_forward():
    params = llmfn.init(CFG, jax.random.key(0))
    tokenizer = make_tokenizer("byte")
    prompts = ["the cat", "小狗"]
    got = samples.complete(params, CFG, tokenizer, prompts, max_new_tokens=4)
    for prompt, text in zip(prompts, got):
        ids = list(tokenizer.encode(prompt))
        for _ in range(4):
            logits = llmfn.forward(params, np.array([ids], np.int32), CFG)  # (1, T, V)
            ids.append(int(np.argmax(logits[0, -1])))
        new = ids[len(tokenizer.encode(prompt)):]
        assert text == tokenizer.decode(np.array(new)), prompt


def test_fact_recall_scores_exact_answers(monkeypatch):
    countries = list(corpus.FACTS)

    def fake(params, cfg, tokenizer, prompts, max_new_tokens):
        answers = [f" {corpus.FACTS[c]}.\nthe dog" for c in countries]
        answers[0] = f" {corpus.FACTS[countries[0]]}s.\n"  # one extra letter: wrong
        answers[1] = f" {corpus.FACTS[countries[1]]}"  # no full stop: wrong
        assert prompts == ["\n" + corpus.fact_prompt(c) for c in countries]
        return answers

    monkeypatch.setattr(samples, "complete", fake)
    recall, wrong = samples.fact_recall(None, CFG, None)
    assert recall == 1 - 2 / len(countries)
    assert sorted(wrong) == sorted(countries[:2])
