"""Tokenizers: text ⇄ token ids, behind one small interface.

Three kinds, all lossless on any Unicode text (Chinese and emoji included):

  byte  V = 256, one id per UTF-8 byte; needs no fitting.
  char  one id per distinct character of the text it was fit on; a character outside
        that set cannot be encoded (ValueError naming it).
  bpe   byte-level BPE trained locally with HF `tokenizers` (GPT-2 style): the 256 bytes
        are always in the vocabulary, so every text encodes; V is a flag.

Every token id stands for a fixed byte string (`to_bytes`), so decoding is concatenation
and `byte_lengths()` gives the exact number of UTF-8 bytes behind every id: that is how
nats per token become bits per byte. A tokenizer is saved as one plain JSON file,
`<directory>/tokenizer.json`, and `load_tokenizer(directory)` reads it back.
"""

import functools
import itertools
import json
import re
from pathlib import Path

import numpy as np
import regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .files import atomic_write

FILENAME = "tokenizer.json"


def _utf8(text: str) -> bytes:
    """text as UTF-8, or a ValueError that points at the first lone surrogate."""
    if not isinstance(text, str):
        raise TypeError(f"expected text as str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text has a lone surrogate {text[e.start]!r} at index {e.start}: it is not valid Unicode"
        ) from None


class Tokenizer:
    """The interface: encode (str → (N,) int32), decode (ids → str), save."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """text → ids, shape (N,), int32."""
        raise NotImplementedError

    def _bytes(self, ids: np.ndarray) -> bytes:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    def to_bytes(self, ids) -> bytes:
        """ids (N,) → the UTF-8 bytes they stand for (use with an incremental decoder to stream)."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {ids.shape}")
        ids = ids.reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"token id {int(ids[bad][0])} is out of range for a vocabulary of {self.vocab_size}"
            )
        return self._bytes(ids.astype(np.int64))

    def decode(self, ids) -> str:
        """ids (N,) → text; the exact inverse of `encode`.

        Id sequences that `encode` never produces may cut a UTF-8 character in two
        (a model can sample them); those bytes decode to U+FFFD rather than raising.
        """
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    @functools.cached_property
    def _byte_lengths(self) -> np.ndarray:
        return np.array([len(self._bytes(np.array([i]))) for i in range(self.vocab_size)], np.int64)

    def byte_lengths(self) -> np.ndarray:
        """(V,) int64: the number of UTF-8 bytes each token id stands for."""
        return self._byte_lengths

    def to_json(self) -> str:
        """The saved form: plain JSON with a "kind" field (deterministic, so it can key a cache)."""
        return json.dumps({"kind": self.kind, **self._state()}, ensure_ascii=False, sort_keys=True)

    def save(self, directory) -> None:
        """Write `<directory>/tokenizer.json` (plain JSON) atomically, creating the directory."""
        with atomic_write(Path(directory) / FILENAME) as f:
            f.write(self.to_json())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte: V = 256."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """text → its UTF-8 bytes as ids, shape (N,) with N = number of bytes, int32."""
        return np.frombuffer(_utf8(text), np.uint8).astype(np.int32)

    def _bytes(self, ids: np.ndarray) -> bytes:
        return ids.astype(np.uint8).tobytes()

    def _state(self) -> dict:
        return {}


class CharTokenizer(Tokenizer):
    """One id per character (Unicode code point) of a fixed alphabet, in code-point order."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a char tokenizer needs at least one character: fit it on non-empty text")
        _utf8(chars)
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._codes = np.array([ord(c) for c in self.chars], np.uint32)  # sorted

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose alphabet is the set of characters in `text`."""
        return cls("".join(set(text)))

    def encode(self, text: str) -> np.ndarray:
        """text → one id per character, shape (N,) with N = len(text), int32."""
        _utf8(text)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, codes), self.vocab_size - 1)
        unknown = np.flatnonzero(self._codes[ids] != codes)
        if unknown.size:
            i = int(unknown[0])
            raise ValueError(
                f"character {text[i]!r} (U+{ord(text[i]):04X}) at index {i} is not in this char "
                f"tokenizer's alphabet of {self.vocab_size}: fit it on text that contains it"
            )
        return ids.astype(np.int32)

    def _bytes(self, ids: np.ndarray) -> bytes:
        return "".join(self.chars[i] for i in ids).encode("utf-8")

    def _state(self) -> dict:
        return {"chars": self.chars}


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, as HF's ByteLevel uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


# GPT-2's pre-tokenizer, the pattern HF's ByteLevel splits on. Splitting here and encoding
# each distinct piece once is several times faster than HF's encode on long text, and equal.
_PRE_TOKENS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
# A boundary after a newline and before a non-space is a pre-token boundary, so the
# trainer can read long text in pieces cut there.
_SAFE_CUT = re.compile(r"\n(?=\S)")
_CHUNK_CHARS = 1 << 16


class BPETokenizer(Tokenizer):
    """Byte-level BPE (HF `tokenizers`, GPT-2 pre-tokenizer, no special tokens)."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        unicode_to_byte = {c: b for b, c in _byte_to_unicode().items()}
        vocab = sorted(hf.get_vocab().items(), key=lambda item: item[1])
        if [i for _, i in vocab] != list(range(self.vocab_size)):
            raise ValueError("BPE vocabulary ids are not 0..V-1: the tokenizer file is corrupt")
        self._token_bytes = [bytes(unicode_to_byte[c] for c in token) for token, _ in vocab]

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Fit byte-level BPE on `text` with at most `vocab_size` ids (fewer if merges run out)."""
        if vocab_size < 256:
            raise ValueError(f"BPE vocab_size must be at least 256 (one id per byte), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        hf.train_from_iterator(_chunks(text), trainer)
        return cls(hf)

    def encode(self, text: str) -> np.ndarray:
        """text → BPE ids, shape (N,), int32."""
        _utf8(text)
        pieces = _PRE_TOKENS.findall(text)
        distinct = list(set(pieces))
        ids = dict(zip(distinct, (e.ids for e in self.hf.encode_batch(distinct, add_special_tokens=False))))
        return np.fromiter(itertools.chain.from_iterable(map(ids.__getitem__, pieces)), np.int32)

    def _bytes(self, ids: np.ndarray) -> bytes:
        return b"".join(self._token_bytes[i] for i in ids)

    def _state(self) -> dict:
        return {"hf": json.loads(self.hf.to_str())}


def _chunks(text: str) -> list[str]:
    """text cut at pre-tokenizer boundaries into pieces of about _CHUNK_CHARS characters."""
    cuts, start = [0], 0
    while (match := _SAFE_CUT.search(text, start + _CHUNK_CHARS)) is not None:
        cuts.append(start := match.end())
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]


def make_tokenizer(kind: str, text: str = "", vocab_size: int = 512) -> Tokenizer:
    """A tokenizer of `kind`: "byte" ignores text and vocab_size, "char" is fit on text
    (vocab_size ignored: V = number of distinct characters), "bpe" is trained on text
    with V = vocab_size (fewer if the text runs out of merges)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}: choose 'byte', 'char' or 'bpe'")


def load_tokenizer(directory) -> Tokenizer:
    """Read the tokenizer that `Tokenizer.save` wrote to `<directory>/tokenizer.json`."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise ValueError(f"no tokenizer at {path}: save one there with Tokenizer.save({str(directory)!r})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        kind = state["kind"]
        if kind == "byte":
            return ByteTokenizer()
        if kind == "char":
            return CharTokenizer(state["chars"])
        if kind == "bpe":
            return BPETokenizer(HFTokenizer.from_str(json.dumps(state["hf"])))
    except Exception as e:  # bad JSON, a missing field, or HF's own parse error
        raise ValueError(f"{path} is not a valid llmfn tokenizer file ({type(e).__name__}: {e})") from None
    raise ValueError(f"{path} has unknown tokenizer kind {kind!r}: expected 'byte', 'char' or 'bpe'")
