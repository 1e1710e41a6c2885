"""Data: cached token memmaps, the split, batches as pure functions of (seed, step), DataError."""

from pathlib import Path

import numpy as np
import pytest

from llmfn import corpus
from llmfn.data import DataError, bytes_per_token, eval_batches, get_batch, load_text, split, tokenize_cached
from llmfn.tokenizer import make_tokenizer

TEXT = corpus.generate(20_000, seed=2)


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer("bpe", TEXT, vocab_size=300)


def test_cache_is_written_once_and_reused(tmp_path, bpe):
    tokens = tokenize_cached(TEXT, bpe, tmp_path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert tokens.tolist() == bpe.encode(TEXT).tolist()
    (cached,) = tmp_path.glob("tokens-*.npy")
    mtime = cached.stat().st_mtime_ns
    again = tokenize_cached(TEXT, bpe, tmp_path)
    assert cached.stat().st_mtime_ns == mtime and np.array_equal(again, tokens)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left behind


def test_cache_key_covers_text_and_tokenizer(tmp_path, bpe):
    tokenize_cached(TEXT, bpe, tmp_path)
    tokenize_cached(TEXT + "x", bpe, tmp_path)
    tokenize_cached(TEXT, make_tokenizer("byte"), tmp_path)
    tokenize_cached(TEXT, make_tokenizer("bpe", TEXT, vocab_size=290), tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 4


def test_cache_is_read_back_not_recomputed(tmp_path):
    tok = make_tokenizer("byte")
    assert tokenize_cached("hello", tok, tmp_path).tolist() == list(b"hello")
    (cached,) = tmp_path.glob("tokens-*.npy")
    np.save(cached, np.array([7, 7, 7], np.uint16))  # stands in for a cached result
    assert tokenize_cached("hello", tok, tmp_path).tolist() == [7, 7, 7]


def test_large_vocab_uses_uint32(tmp_path):
    class Wide:
        kind, vocab_size = "wide", 70_000

        def encode(self, text):
            return np.array([69_999, 0], np.int32)

        def to_json(self):
            return "{}"

    tokens = tokenize_cached("ab", Wide(), tmp_path)
    assert tokens.dtype == np.uint32 and tokens.tolist() == [69_999, 0]


def test_path_input_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "d" / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "d" / "sub" / "c.txt").write_text("小猫", encoding="utf-8")
    (tmp_path / "d" / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    assert load_text(tmp_path / "d") == "first\nsecond\n小猫"
    assert load_text(tmp_path / "d" / "b.txt") == "second"
    tokens = tokenize_cached(tmp_path / "d", make_tokenizer("byte"), tmp_path / "cache")
    assert bytes(tokens.tolist()).decode("utf-8") == "first\nsecond\n小猫"


def test_split():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    assert np.shares_memory(train, tokens)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split(tokens, 1.0)
    with pytest.raises(DataError, match="both splits must be non-empty"):
        split(np.arange(3), 0.1)


def test_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(5000, dtype=np.uint16)
    x, y = get_batch(tokens, seed=1, step=7, batch_size=8, context=32)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    x2, y2 = get_batch(tokens, seed=1, step=7, batch_size=8, context=32)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, get_batch(tokens, seed=1, step=8, batch_size=8, context=32)[0])
    assert not np.array_equal(x, get_batch(tokens, seed=2, step=7, batch_size=8, context=32)[0])
    offsets = np.random.default_rng([1, 7]).integers(0, 5000 - 32, size=8)
    assert np.array_equal(x[:, 0], offsets)  # tokens are their own positions here


def test_targets_are_inputs_shifted_and_windows_are_contiguous():
    tokens = np.arange(300, dtype=np.uint16)
    for step in range(20):
        x, y = get_batch(tokens, seed=0, step=step, batch_size=16, context=10)
        assert np.array_equal(y, x + 1)
        assert np.array_equal(x, x[:, :1] + np.arange(10))
        assert y.max() <= 299 and x.min() >= 0


def test_every_window_can_be_drawn():
    tokens = np.arange(12, dtype=np.uint16)
    firsts = {int(v) for step in range(200) for v in get_batch(tokens, 0, step, 4, 10)[0][:, 0]}
    assert firsts == {0, 1}


def test_eval_batches_tile_the_split():
    tokens = np.arange(105, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, context=10, max_batches=100))
    assert [x.shape for x, _ in batches] == [(4, 10), (4, 10), (2, 10)]
    targets = np.concatenate([y.reshape(-1) for _, y in batches])
    assert np.array_equal(targets, np.arange(1, 101))
    for x, y in batches:
        assert np.array_equal(y, x + 1)
    assert len(list(eval_batches(tokens, 4, 10, max_batches=2))) == 2
    assert [x.tolist() for x, _ in eval_batches(tokens, 4, 10, 2)] == [x.tolist() for x, _ in batches[:2]]


def test_bytes_per_token(bpe):
    ids = bpe.encode(TEXT)
    expected = len(TEXT.encode("utf-8")) / len(ids)
    assert bytes_per_token(TEXT, bpe) == pytest.approx(expected)
    assert bytes_per_token(ids, bpe) == pytest.approx(expected)
    chinese = "小猫坐在垫子上。"
    assert bytes_per_token(chinese, make_tokenizer("byte")) == 1.0
    assert bytes_per_token(chinese, make_tokenizer("char", chinese)) == 3.0


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_text(tmp_path / "nope.txt")


def test_empty_file_and_empty_text(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_text(tmp_path)
    with pytest.raises(DataError, match="text is empty"):
        tokenize_cached("", make_tokenizer("byte"), tmp_path)


def test_directory_without_text_files(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"no \*\.txt files"):
        load_text(tmp_path)


def test_not_utf8_names_file_and_offset(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes("小猫".encode("utf-8") + b"ab\xffcd")
    with pytest.raises(DataError, match=r"bad\.txt is not UTF-8 text: byte 0xff at byte offset 8"):
        load_text(tmp_path)
    with pytest.raises(DataError, match="byte offset 8"):
        tokenize_cached(tmp_path / "bad.txt", make_tokenizer("byte"), tmp_path / "cache")


def test_too_short_for_one_window():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match=r"only 10 tokens, fewer than one context window plus one \(11\)"):
        get_batch(tokens, 0, 0, batch_size=2, context=10)
    with pytest.raises(DataError, match="only 10 tokens"):
        next(eval_batches(tokens, 2, 10, 1))
    assert get_batch(np.arange(11), 0, 0, 2, 10)[0].shape == (2, 10)


def test_errors_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError) as info:
        load_text(tmp_path / "missing")
    assert "\n" not in str(info.value) and isinstance(info.value, DataError)


def test_path_objects_are_read_and_path_strings_refused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("from the file", encoding="utf-8")
    byte = make_tokenizer("byte")
    with pytest.raises(TypeError, match=r"pass pathlib\.Path"):
        tokenize_cached(str(path), byte, tmp_path)
    with pytest.raises(TypeError, match="got bytes"):
        tokenize_cached(b"text", byte, tmp_path)
    assert bytes(tokenize_cached(Path(path), byte, tmp_path).tolist()).decode() == "from the file"
