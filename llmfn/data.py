"""Text → a token memmap → batches, where a batch is a pure function of (seed, step).

Tokenising happens once: `tokenize_cached` writes the ids to `<cache_dir>/tokens-<key>.npy`
(uint16 when V <= 65536, else uint32), keyed by a hash of the text and of the tokenizer's
saved state, written to a temporary file and renamed into place (atomic), and read back as
a read-only memmap. The caller picks cache_dir: the run directory is the natural choice,
so a resumed run reuses the ids (several runs on one text each tokenise it once).

Batches need no loader state: `get_batch` draws its window offsets from
`np.random.default_rng([seed, step])`, so step n of a resumed run sees exactly the batch
it would have seen without the interruption.

Bits per byte: a model's mean loss in nats per target token converts exactly as
  bits/byte = mean_nats / ln 2 / bytes_per_token(targets, tokenizer)
where `targets` are exactly the target ids the loss was averaged over: every token id
stands for a fixed number of UTF-8 bytes (`Tokenizer.byte_lengths`).
"""

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .files import atomic_write
from .tokenizer import Tokenizer


class DataError(ValueError):
    """Bad training data: a missing path, empty text, too few tokens, text that is not UTF-8."""


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path} is empty: give a file with some text in it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason}); "
            "convert the file to UTF-8"
        ) from None


def text_files(path) -> list[Path]:
    """The files `load_text(path)` reads: [path] for a file; for a directory, every *.txt
    file below it (recursively, skipping hidden files and folders), in sorted path order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(
        p for p in path.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} is a directory with no *.txt files in it")
    return files


def load_text(path) -> str:
    """The text of a file, or of a directory's *.txt files (see `text_files`) joined in
    sorted order, with "\\n" added after any file that does not already end with one."""
    texts = [_read_utf8(p) for p in text_files(path)]
    return "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))


def _cache_key(text: str, tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(tokenizer.to_json().encode("utf-8"))
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:32]


def _text_of(text_or_path) -> str:
    if isinstance(text_or_path, os.PathLike):
        return load_text(text_or_path)
    if not isinstance(text_or_path, str):
        raise TypeError(f"expected text (str) or a path (pathlib.Path), got {type(text_or_path).__name__}")
    # A short one-line str naming an existing file is almost surely a path passed by mistake.
    one_line = len(text_or_path) < 4096 and not any(c in text_or_path for c in "\n\0")
    if one_line and os.path.exists(text_or_path):
        raise TypeError(
            f"{text_or_path!r} is a str that names an existing path: pass pathlib.Path({text_or_path!r}) to read it"
        )
    return text_or_path


def tokenize_cached(text_or_path, tokenizer: Tokenizer, cache_dir) -> np.ndarray:
    """Token ids of a text, as a read-only memmap (N,) uint16 (V <= 65536) or uint32.

    text_or_path: a `str` is the text itself; a `pathlib.Path` (any os.PathLike) is a file
    or directory read with `load_text`. The ids are cached in `cache_dir` (see module doc).
    """
    text = _text_of(text_or_path)
    if not text:
        raise DataError("the text is empty: there is nothing to train on")
    cache_dir = Path(cache_dir)
    path = cache_dir / f"tokens-{tokenizer.kind}{tokenizer.vocab_size}-{_cache_key(text, tokenizer)}.npy"
    if not path.is_file():
        ids = tokenizer.encode(text)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        with atomic_write(path, binary=True) as f:
            np.save(f, ids.astype(dtype))
    return np.load(path, mmap_mode="r")


def split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(N,) → (train, val): the first 1 - val_fraction of the tokens, then the rest (views, no copy)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    n_val = round(len(tokens) * val_fraction)
    if n_val < 1 or n_val >= len(tokens):
        raise DataError(
            f"{len(tokens)} tokens cannot be split with val_fraction={val_fraction}: "
            "both splits must be non-empty; use more text"
        )
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _check_length(tokens: np.ndarray, context: int) -> None:
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    if len(tokens) < context + 1:
        raise DataError(
            f"only {len(tokens)} tokens, fewer than one context window plus one ({context + 1}): "
            "use more text or a shorter context"
        )


def get_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch `step` of a run seeded `seed`: inputs (B, T) int32 and targets (B, T) int32.

    B = batch_size windows of T + 1 = context + 1 consecutive tokens at offsets drawn
    uniformly from np.random.default_rng([seed, step]); targets are inputs shifted by one.
    """
    _check_length(tokens, context)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    offsets = np.random.default_rng([seed, step]).integers(0, len(tokens) - context, size=batch_size)  # (B,)
    windows = np.asarray(tokens[offsets[:, None] + np.arange(context + 1)], np.int32)  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(
    tokens: np.ndarray, batch_size: int, context: int, max_batches: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic (inputs, targets) batches, each (B, T) int32, over consecutive windows.

    Window w has inputs tokens[wT : wT + T] and targets tokens[wT + 1 : wT + T + 1], so the
    targets of all windows tile the split without overlap. Batches hold batch_size windows,
    except that the last one holds the windows left over; at most max_batches are yielded.
    """
    _check_length(tokens, context)
    if batch_size < 1 or max_batches < 1:
        raise ValueError(f"batch_size and max_batches must be positive, got {batch_size} and {max_batches}")
    n_windows = min((len(tokens) - 1) // context, batch_size * max_batches)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * context  # (B,)
        windows = np.asarray(tokens[starts[:, None] + np.arange(context + 1)], np.int32)  # (B, T+1)
        yield windows[:, :-1], windows[:, 1:]


def bytes_per_token(tokens_or_text, tokenizer: Tokenizer) -> float:
    """Mean UTF-8 bytes per token: of the given ids (N,), or of `tokenizer.encode(text)` for a str."""
    if isinstance(tokens_or_text, str):
        n_bytes, n_tokens = len(tokens_or_text.encode("utf-8")), len(tokenizer.encode(tokens_or_text))
    else:
        ids = np.asarray(tokens_or_text).reshape(-1)
        n_bytes, n_tokens = int(tokenizer.byte_lengths()[ids].sum()), ids.size
    if n_tokens == 0:
        raise ValueError("bytes_per_token needs at least one token")
    return n_bytes / n_tokens
