"""Tokenizers: lossless round trips, save/load, errors, BPE vocabulary size, byte lengths."""

import json

import numpy as np
import pytest

from llmfn import corpus
from llmfn.tokenizer import load_tokenizer, make_tokenizer

TEXTS = {
    "ascii": "the cat sat on the mat.\n  tabs\tand  spaces \r\n",
    "chinese": "小猫坐在垫子上。你好，世界！",
    "emoji": "🐱👍🏽 👨‍👩‍👧 🇫🇷",
    "mixed": "naïve café — 小狗 likes 🍎\n\nΩ≈ç√ 𝔘𝔫𝔦",
    "empty": "",
}
FIT_TEXT = corpus.generate(20_000, seed=1) + "".join(TEXTS.values())


@pytest.fixture(scope="module", params=["byte", "char", "bpe"])
def tokenizer(request):
    return make_tokenizer(request.param, FIT_TEXT, vocab_size=300)


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(tokenizer, name):
    text = TEXTS[name]
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ((0 <= ids) & (ids < tokenizer.vocab_size)).all()
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text


def test_byte_ids_are_utf8_bytes():
    text = TEXTS["mixed"]
    assert make_tokenizer("byte", "").encode(text).tolist() == list(text.encode("utf-8"))


def test_char_ids_are_characters():
    tok = make_tokenizer("char", "cab小")
    assert tok.vocab_size == 4
    assert tok.encode("小abc").tolist() == [3, 0, 1, 2]  # code-point order: a b c 小


def test_bpe_matches_hf_and_compresses():
    tok = make_tokenizer("bpe", FIT_TEXT, vocab_size=300)
    text = corpus.generate(3_000, seed=7) + TEXTS["mixed"]
    ids = tok.encode(text)
    assert ids.tolist() == tok.hf.encode(text).ids  # chunked encoding = one-piece encoding
    assert tok.hf.decode(ids.tolist()) == text  # HF's own decoder agrees with ours
    assert len(ids) < len(text.encode("utf-8"))


def test_bpe_training_reads_long_text_in_pieces_like_one_piece(monkeypatch):
    text = FIT_TEXT + "\n\n  x\n\ty\n \n z" + "it's 12,345 don't\r\n\t  ok  " * 20
    whole = make_tokenizer("bpe", text, vocab_size=320)
    monkeypatch.setattr("llmfn.tokenizer._CHUNK_CHARS", 50)
    assert make_tokenizer("bpe", text, vocab_size=320).to_json() == whole.to_json()


def test_bpe_encode_equals_hf_encode_on_awkward_text():
    tok = make_tokenizer("bpe", FIT_TEXT, vocab_size=300)
    text = "".join(TEXTS.values()) + "it's 12,345 don't I'LL\r\n\t  ok  \n\n  x\u00a0y\u3000z 123abc ..."
    assert tok.encode(text).tolist() == tok.hf.encode(text).ids


@pytest.mark.parametrize("vocab_size", [256, 300, 400])
def test_bpe_vocab_size_is_honoured(vocab_size):
    tok = make_tokenizer("bpe", FIT_TEXT, vocab_size=vocab_size)
    assert tok.vocab_size == vocab_size


def test_bpe_training_is_deterministic():
    assert make_tokenizer("bpe", FIT_TEXT, 320).to_json() == make_tokenizer("bpe", FIT_TEXT, 320).to_json()


def test_bpe_vocab_size_below_bytes_is_an_error():
    with pytest.raises(ValueError, match="at least 256"):
        make_tokenizer("bpe", FIT_TEXT, vocab_size=100)


def test_byte_lengths_are_exact(tokenizer):
    text = TEXTS["mixed"] + TEXTS["chinese"]
    ids = tokenizer.encode(text)
    lengths = tokenizer.byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,)
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert [len(tokenizer.to_bytes([i])) for i in ids] == lengths[ids].tolist()


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["kind"] == tokenizer.kind
    loaded = load_tokenizer(tmp_path / "run")
    assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
    text = "".join(TEXTS.values())
    assert loaded.encode(text).tolist() == tokenizer.encode(text).tolist()
    assert loaded.decode(tokenizer.encode(text)) == text
    assert loaded.to_json() == tokenizer.to_json()


def test_char_unknown_character_is_named():
    tok = make_tokenizer("char", "abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at index 2"):
        tok.encode("abz")


def test_decode_rejects_out_of_range_ids(tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([-1])


def test_byte_decode_of_a_cut_character_does_not_raise():
    ids = make_tokenizer("byte", "").encode("猫")
    assert make_tokenizer("byte", "").decode(ids[:2]) == "\ufffd"


def test_lone_surrogate_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer.encode("ab\ud800")


def test_bad_kind_and_empty_char_text():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'words'"):
        make_tokenizer("words", "abc")
    with pytest.raises(ValueError, match="at least one character"):
        make_tokenizer("char", "")


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid llmfn tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "bpe", "hf": {"model": 3}}')
    with pytest.raises(ValueError, match="not a valid llmfn tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "morse"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'morse'"):
        load_tokenizer(tmp_path)

