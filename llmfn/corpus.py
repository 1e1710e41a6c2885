"""The built-in corpus: sentences from a seeded probabilistic grammar whose entropy rate is known exactly.

A sentence is a template ("the {animal} {posture} {prep} the {place}.") with each slot
filled independently from a small weighted word list, followed by "\\n". Templates cover
simple English scenes, simple Chinese scenes ("小猫坐在垫子上。") and a table of world
facts ("the capital of france is paris."). Sentences are i.i.d.

Why the entropy rate of the byte stream is exactly H(S) / E[bytes per sentence]:
  1. "\\n" ends every sentence and occurs nowhere inside one, so the byte stream splits
     into sentences in exactly one way: n sentences ⇄ their concatenation is a bijection.
  2. Every sentence string has exactly one derivation (template + fillers): templates
     differ in their literal text or in slot word lists that share no word at the point
     where they diverge, and within a template the slots are separated by fixed text or
     (Chinese) by word lists no member of which is a prefix of another combination. The
     test suite checks this by enumerating every sentence. Hence H(S), the entropy of the
     sentence string, equals the entropy of its derivation: H(template) plus, weighted by
     template probability, the entropies of that template's slots.
  3. n i.i.d. sentences carry n H(S) bits in Σ L_i bytes, and Σ L_i / n → E[L] (law of
     large numbers), so the rate is H(S) / E[L] bits per byte — the entropy rate of the
     stationary renewal process of concatenated i.i.d. sentences.
A model cannot beat this rate on a long stream. Scored on short windows that start at
random offsets it pays a little more, because a window that starts mid-sentence does not
know where it is; `window_floor_bpb(context)` gives that exact finite-window floor for a
byte-level model (about 2% above the rate at context 256).
"""

import collections
import functools
import itertools
import math
import string

import numpy as np

FACTS: dict[str, str] = {
    "france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid",
    "portugal": "lisbon", "greece": "athens", "poland": "warsaw", "austria": "vienna",
    "hungary": "budapest", "sweden": "stockholm", "norway": "oslo", "finland": "helsinki",
    "denmark": "copenhagen", "ireland": "dublin", "belgium": "brussels", "russia": "moscow",
    "ukraine": "kyiv", "turkey": "ankara", "egypt": "cairo", "kenya": "nairobi",
    "nigeria": "abuja", "ghana": "accra", "morocco": "rabat", "ethiopia": "addis ababa",
    "japan": "tokyo", "china": "beijing", "india": "new delhi", "thailand": "bangkok",
    "vietnam": "hanoi", "indonesia": "jakarta", "south korea": "seoul", "iran": "tehran",
    "canada": "ottawa", "mexico": "mexico city", "brazil": "brasilia", "argentina": "buenos aires",
    "peru": "lima", "chile": "santiago", "cuba": "havana", "australia": "canberra",
}  # country -> capital, lower case, exactly as written in the text


def _normalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {word: w / total for word, w in weights.items()}


# slot name -> {filler: probability}. Integer weights keep the table readable.
SLOTS: dict[str, dict[str, float]] = {name: _normalise(w) for name, w in {
    "animal": {"cat": 3, "dog": 3, "bird": 2, "fox": 1, "cow": 1, "pig": 1, "hen": 1, "owl": 1,
               "duck": 1, "goat": 1, "frog": 1, "bear": 1},
    "posture": {"sat": 3, "slept": 2, "stood": 1, "lay": 1, "hid": 1, "waited": 1, "sang": 1, "ate": 1},
    "prep": {"on": 3, "under": 1, "near": 1, "by": 1, "behind": 1, "beside": 1, "above": 1, "below": 1},
    "place": {"mat": 3, "bed": 2, "rug": 1, "box": 1, "chair": 1, "table": 1, "log": 1, "hill": 1,
              "wall": 1, "tree": 1, "door": 1, "roof": 1},
    "adj": {"big": 2, "small": 2, "red": 1, "old": 1, "happy": 1, "little": 1, "brown": 1, "quiet": 1},
    "verb": {"sees": 2, "likes": 2, "chases": 1, "wants": 1, "finds": 1, "eats": 1, "hides": 1, "loves": 1},
    "thing": {"ball": 2, "bone": 1, "fish": 1, "hat": 1, "cake": 1, "apple": 1, "sock": 1, "shoe": 1,
              "bell": 1, "kite": 1, "drum": 1, "cup": 1},
    "name": {"tom": 1, "anna": 1, "sam": 1, "lily": 1, "ben": 1, "mia": 1, "max": 1, "zoe": 1,
             "leo": 1, "ava": 1, "noah": 1, "emma": 1},
    "number": {str(n): 1 for n in range(2, 100)},
    "hour": {str(h): 1 for h in range(1, 13)},
    "minute": {f"{m:02d}": 1 for m in range(60)},
    "plural": {"cups": 1, "books": 1, "eggs": 1, "apples": 1, "pens": 1, "stars": 1, "coins": 1, "shells": 1},
    "fact": {f"{country} is {capital}": 1 for country, capital in FACTS.items()},
    "zh_animal": {"小猫": 3, "小狗": 3, "小鸟": 2, "小鸡": 1, "小兔": 1, "小鸭": 1, "小羊": 1, "小鱼": 1},
    "zh_posture": {"坐在": 3, "睡在": 2, "站在": 1, "躺在": 1},
    "zh_place": {"垫子": 3, "床": 2, "椅子": 1, "桌子": 1, "箱子": 1, "草地": 1, "树": 1, "门": 1},
    "zh_side": {"上": 3, "下": 1, "旁边": 1, "后面": 1},
    "zh_name": {"小明": 2, "小红": 2, "妈妈": 1, "爸爸": 1, "哥哥": 1, "姐姐": 1},
    "zh_verb": {"吃了": 2, "买了": 1, "想要": 1, "拿了": 1},
    "zh_count": {"两": 2, "三": 1, "四": 1, "五": 1, "六": 1, "七": 1, "八": 1, "九": 1},
    "zh_food": {"苹果": 2, "梨": 1, "桃子": 1, "包子": 1, "饺子": 1, "鸡蛋": 1},
}.items()}

# template -> probability; each "{slot}" is filled independently, then "\n" is appended.
TEMPLATES: dict[str, float] = _normalise({
    "the {animal} {posture} {prep} the {place}.": 3,
    "the {adj} {animal} {verb} the {thing}.": 3,
    "{name} has {number} {plural}.": 3,
    "{name} woke up at {hour}:{minute}.": 2,
    "the capital of {fact}.": 1,
    "{zh_animal}{zh_posture}{zh_place}{zh_side}。": 2,
    "{zh_name}{zh_verb}{zh_count}个{zh_food}。": 2,
})
SEPARATOR = "\n"


def slots_of(template: str) -> list[str]:
    """The slot names of a template, in order (a name may repeat: each use is a fresh draw)."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _positional(template: str) -> str:
    """The template with every "{slot}" replaced by "{}", for str.format(*fillers)."""
    parts = string.Formatter().parse(template)
    return "".join(literal + ("{}" if field is not None else "") for literal, field, _, _ in parts)


def _entropy_bits(dist: dict[str, float]) -> float:
    return -sum(p * math.log2(p) for p in dist.values())


def _mean_bytes(dist: dict[str, float]) -> float:
    return sum(p * len(word.encode("utf-8")) for word, p in dist.items())


def sentence_entropy_bits() -> float:
    """H(S): the exact entropy of one sentence string (separator included), in bits."""
    return _entropy_bits(TEMPLATES) + sum(
        p * sum(_entropy_bits(SLOTS[slot]) for slot in slots_of(t)) for t, p in TEMPLATES.items()
    )


def mean_sentence_bytes() -> float:
    """E[L]: the exact mean length of one sentence in UTF-8 bytes, separator included."""
    return len(SEPARATOR.encode("utf-8")) + sum(
        p * (len(_positional(t).format(*[""] * len(slots_of(t))).encode("utf-8"))
             + sum(_mean_bytes(SLOTS[slot]) for slot in slots_of(t)))
        for t, p in TEMPLATES.items()
    )


def entropy_rate_bpb() -> float:
    """The exact entropy rate of the corpus byte stream, in bits per UTF-8 byte: H(S) / E[L]."""
    return sentence_entropy_bits() / mean_sentence_bytes()


@functools.cache
def sentence_distribution() -> dict[str, float]:
    """Every sentence string (separator included) → its exact probability, summed over derivations."""
    dist = collections.defaultdict(float)
    for template, p in TEMPLATES.items():
        fmt = _positional(template) + SEPARATOR
        for fillers in itertools.product(*[SLOTS[slot].items() for slot in slots_of(template)]):
            dist[fmt.format(*[word for word, _ in fillers])] += p * math.prod(q for _, q in fillers)
    return dict(dist)


def _entropy_of(probs) -> float:
    return -sum(p * math.log2(p) for p in probs if p > 0)


def _collapsed_entropy(dist: dict[bytes, float], n: int) -> float:
    """The entropy of the first n bytes of a string drawn from dist."""
    prefixes = collections.defaultdict(float)
    for s, p in dist.items():
        prefixes[s[:n]] += p
    return _entropy_of(prefixes.values())


def window_floor_bits(sentences: dict[bytes, float], context: int) -> float:
    """(H(X_0..X_T) - H(X_0)) / T for the stationary stream of i.i.d. `sentences`, T = context.

    That is the least mean loss, in bits per target, of a byte-level model scored on windows
    of T targets (X_1..X_T after X_0) that start at uniformly random byte offsets.
    """
    mean_len = sum(p * len(s) for s, p in sentences.items())
    max_len = max(len(s) for s in sentences)
    length_probs = collections.defaultdict(float)  # P(L = l)
    for s, p in sentences.items():
        length_probs[len(s)] += p
    prefix_h = [_collapsed_entropy(sentences, n) for n in range(max_len + 1)]
    # fresh[n]: entropy of the first n bytes of a stream that starts at a sentence start;
    # once the first sentence has ended (L = l < n), the rest is a fresh stream.
    fresh = [0.0]
    for n in range(1, context + 2):
        fresh.append(prefix_h[min(n, max_len)] + sum(q * fresh[n - l] for l, q in length_probs.items() if l < n))
    # A uniformly random offset lands in sentence s with probability p(s) L(s) / E[L], at
    # each of its L(s) bytes alike: the window opens with the tail s[j:].
    tails = collections.defaultdict(float)
    for s, p in sentences.items():
        for j in range(len(s)):
            tails[s[j:]] += p / mean_len

    def window_entropy(m: int) -> float:
        return _collapsed_entropy(tails, m) + sum(p * fresh[m - len(t)] for t, p in tails.items() if len(t) < m)

    return (window_entropy(context + 1) - window_entropy(1)) / context


@functools.cache
def window_floor_bpb(context: int) -> float:
    """The exact floor, in bits per byte, of a byte-level model evaluated on windows of
    `context` targets at random offsets of the corpus (see `window_floor_bits`).

    It is above `entropy_rate_bpb()` and falls to it like 1 / context.
    """
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    return window_floor_bits({s.encode("utf-8"): p for s, p in sentence_distribution().items()}, context)


_CHUNK = 4096  # sentences drawn per step; fixed, so a longer text extends a shorter one


def _sample(rng: np.random.Generator, n: int) -> list[str]:
    """n i.i.d. sentences, each ending in the separator."""
    templates = list(TEMPLATES)
    chosen = rng.choice(len(templates), size=n, p=list(TEMPLATES.values()))
    sentences = [""] * n
    for k, template in enumerate(templates):
        rows = np.flatnonzero(chosen == k)
        columns = []
        for slot in slots_of(template):
            words = list(SLOTS[slot])
            columns.append([words[i] for i in rng.choice(len(words), size=rows.size, p=list(SLOTS[slot].values()))])
        fmt = _positional(template) + SEPARATOR
        for row, fillers in zip(rows, zip(*columns)):
            sentences[row] = fmt.format(*fillers)
    return sentences


def generate(n_bytes: int, seed: int = 0) -> str:
    """Whole sentences, each ending in "\\n", at least n_bytes bytes of UTF-8 in all.

    Deterministic in seed, and generate(m, seed) is a prefix of generate(n, seed) for m <= n.
    """
    if not isinstance(n_bytes, (int, np.integer)) or n_bytes < 0:
        raise ValueError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
    rng = np.random.default_rng(seed)
    sentences, total = [], 0
    while total < n_bytes:
        for sentence in _sample(rng, _CHUNK):
            sentences.append(sentence)
            total += len(sentence.encode("utf-8"))
            if total >= n_bytes:
                break
    return "".join(sentences)


def fact_prompt(country: str) -> str:
    """The text before the capital, e.g. "the capital of france is" (no trailing space).

    In the corpus the prompt is followed by " paris.\\n": the space belongs to the answer,
    as byte-level BPE puts it at the start of the word token. Sentences start after "\\n",
    so "\\n" + prompt also matches the text exactly.
    """
    if country not in FACTS:
        raise ValueError(f"unknown country {country!r}: FACTS has {len(FACTS)} countries, e.g. {next(iter(FACTS))!r}")
    return f"the capital of {country} is"
