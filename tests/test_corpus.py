"""The built-in corpus: its analytic entropy rate against an enumeration and a Monte-Carlo
estimate from sampled text, unique parseability, determinism, the fact table."""

import collections
import itertools
import math
import re

import numpy as np
import pytest

from llmfn import corpus


@pytest.fixture(scope="module")
def grammar():
    """Every sentence string → (probability, number of derivations), built here from the tables."""
    table = collections.defaultdict(lambda: [0.0, 0])
    for template, p_template in corpus.TEMPLATES.items():
        names = re.findall(r"\{(\w+)\}", template)
        assert len(names) == len(set(names)), template
        for choice in itertools.product(*[corpus.SLOTS[name].items() for name in names]):
            sentence = template.format(**{name: word for name, (word, _) in zip(names, choice)}) + "\n"
            entry = table[sentence]
            entry[0] += p_template * math.prod(p for _, p in choice)
            entry[1] += 1
    return dict(table)


def test_every_sentence_has_one_derivation(grammar):
    ambiguous = [s for s, (_, n) in grammar.items() if n > 1]
    assert not ambiguous, ambiguous[:5]
    assert all(s.count("\n") == 1 and s.endswith("\n") for s in grammar)
    assert sum(p for p, _ in grammar.values()) == pytest.approx(1.0, abs=1e-12)


def test_entropy_rate_matches_enumeration(grammar):
    h = -sum(p * math.log2(p) for p, _ in grammar.values())
    mean_bytes = sum(p * len(s.encode("utf-8")) for s, (p, _) in grammar.items())
    assert corpus.sentence_entropy_bits() == pytest.approx(h, rel=1e-12)
    assert corpus.mean_sentence_bytes() == pytest.approx(mean_bytes, rel=1e-12)
    assert corpus.entropy_rate_bpb() == pytest.approx(h / mean_bytes, rel=1e-12)
    assert corpus.sentence_distribution() == pytest.approx({s: p for s, (p, _) in grammar.items()}, rel=1e-12)


def test_entropy_rate_matches_monte_carlo(grammar):
    """Parse sampled text back into sentences and average their exact log-probabilities."""
    sentences = corpus.generate(400_000, seed=123).splitlines(keepends=True)
    bits = np.array([-math.log2(grammar[s][0]) for s in sentences])  # KeyError = ungrammatical sample
    n_bytes = np.array([len(s.encode("utf-8")) for s in sentences], float)
    estimate = bits.sum() / n_bytes.sum()
    # standard error of a ratio of means (delta method)
    residual = bits - estimate * n_bytes
    stderr = residual.std(ddof=1) / math.sqrt(len(sentences)) / n_bytes.mean()
    assert stderr < 0.005 * estimate  # the test can tell a 2% error apart
    assert abs(estimate - corpus.entropy_rate_bpb()) < 4 * stderr


def test_template_frequencies_match(grammar):
    sentences = corpus.generate(200_000, seed=9).splitlines()
    patterns = {t: re.compile(_template_regex(t)) for t in corpus.TEMPLATES}
    observed = collections.Counter()
    for s in sentences:
        matches = [t for t, pattern in patterns.items() if pattern.fullmatch(s)]
        assert len(matches) == 1, s
        observed[matches[0]] += 1
    for template, p in corpus.TEMPLATES.items():
        expected = p * len(sentences)
        assert abs(observed[template] - expected) < 5 * math.sqrt(expected * (1 - p))


def _template_regex(template: str) -> str:
    parts = re.split(r"(\{\w+\})", template)
    return "".join(
        "(?:" + "|".join(map(re.escape, corpus.SLOTS[part[1:-1]])) + ")" if part.startswith("{") else re.escape(part)
        for part in parts
    )


def test_generate_is_deterministic_whole_sentences_and_prefix_stable():
    text = corpus.generate(50_000, seed=5)
    assert text == corpus.generate(50_000, seed=5)
    assert text != corpus.generate(50_000, seed=6)
    assert corpus.generate(60_000, seed=5).startswith(text)
    assert text.endswith("\n")
    n = len(text.encode("utf-8"))
    last = text[:-1].rsplit("\n", 1)[1] + "\n"
    assert 50_000 <= n < 50_000 + len(last.encode("utf-8"))
    assert corpus.generate(0) == ""
    with pytest.raises(ValueError, match="non-negative"):
        corpus.generate(-1)


def test_text_has_chinese_and_every_fact():
    text = corpus.generate(300_000, seed=0)
    assert "坐在" in text and "。\n" in text
    for country, capital in corpus.FACTS.items():
        prompt = corpus.fact_prompt(country)
        assert not prompt.endswith(" ")
        assert f"\n{prompt} {capital}.\n" in text, country
    assert 30 <= len(corpus.FACTS) <= 60
    with pytest.raises(ValueError, match="unknown country 'atlantis'"):
        corpus.fact_prompt("atlantis")


def _brute_force_window_floor(sentences: dict[bytes, float], context: int) -> float:
    """Enumerate every window of context + 1 bytes of the stationary stream, with its probability."""
    mean_len = sum(p * len(s) for s, p in sentences.items())

    def windows(prefix: bytes, p: float, m: int):
        if len(prefix) >= m:
            yield prefix[:m], p
            return
        for s, q in sentences.items():
            yield from windows(prefix + s, p * q, m)

    def entropy(m: int) -> float:
        dist = collections.defaultdict(float)
        for s, p in sentences.items():
            for j in range(len(s)):
                for w, q in windows(s[j:], p / mean_len, m):
                    dist[w] += q
        return -sum(q * math.log2(q) for q in dist.values())

    return (entropy(context + 1) - entropy(1)) / context


@pytest.mark.parametrize("context", [1, 3, 7])
def test_window_floor_matches_brute_force(context):
    toy = {b"ab\n": 0.5, b"b\n": 0.3, b"aab\n": 0.2}
    assert corpus.window_floor_bits(toy, context) == pytest.approx(_brute_force_window_floor(toy, context), rel=1e-10)


def test_window_floor_falls_to_the_rate_like_one_over_context():
    rate = corpus.entropy_rate_bpb()
    excess_256 = corpus.window_floor_bpb(256) - rate
    excess_512 = corpus.window_floor_bpb(512) - rate
    assert 0 < excess_512 < excess_256 < 0.05 * rate
    assert excess_512 == pytest.approx(excess_256 / 2, rel=0.02)
    with pytest.raises(ValueError, match="context must be positive"):
        corpus.window_floor_bpb(0)
