"""sample.py: streamed text against `generate` called directly, and one-line refusals."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmfn
from llmfn import Config, checkpoint
from llmfn.generate import generate
from llmfn.tokenizer import ByteTokenizer, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

CFG = llmfn.Config(vocab_size=256, context=48, n_layers=2, d_model=32, n_heads=4, init_std=0.3)
N = 19  # new tokens: the prefill's one, then three scans of 6


def _make_run(run: Path, cfg: Config = CFG, tokenizer=None) -> dict:
    params = llmfn.init(cfg, jax.random.key(0))
    checkpoint.save_config(run, cfg)
    (tokenizer or ByteTokenizer()).save(run)
    state = {"params": params, "opt_state": {"m": jnp.zeros(())}, "step": jnp.asarray(1), "rng": jax.random.key(0)}
    mngr = checkpoint.manager(run)
    checkpoint.save(mngr, state)
    mngr.close()
    return params



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "tiny"
    return path, _make_run(path)


def _reference(params, prompt: str, seed: int, i: int, n: int, **sampling) -> str:
    ids = jnp.asarray(np.frombuffer(prompt.encode(), np.uint8).astype(np.int32))[None]
    key = jax.random.fold_in(jax.random.key(seed), i)
    tokens, valid = generate(params, ids, key, CFG, n, **sampling)
    return bytes(np.asarray(tokens)[0][np.asarray(valid)[0]].astype(np.uint8)).decode("utf-8", errors="replace")


def test_streams_the_same_text_generate_makes(run, capsys):
    path, params = run
    argv = ["--run", str(path), "--prompt", "小猫", "--max-new-tokens", str(N), "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3", "--num-samples", "2", "--chunk", "6"]
    assert sample.main(argv) == 0
    out = capsys.readouterr().out
    texts = [block.split("\n", 1)[1][:-1] for block in out.split("--- sample ")[1:]]
    assert len(texts) == 2 and texts[0] != texts[1]
    for i, text in enumerate(texts):
        assert text == _reference(params, "小猫", 3, i, N, temperature=0.8, top_p=0.9)


def test_stream_yields_pieces_that_join_to_the_whole_text(run):
    path, params = run
    prompt = np.frombuffer("小猫".encode(), np.uint8).astype(np.int32)
    pieces = list(sample.stream(params, CFG, ByteTokenizer(), prompt, jax.random.key(1), N, 6, temperature=0.0))
    assert len(pieces) == 1 + 3 + 1  # prefill, (N - 1) / 6 scans, the decoder's flush
    greedy = generate(params, jnp.asarray(prompt)[None], jax.random.key(1), CFG, N, temperature=0.0)[0]
    want = bytes(np.asarray(greedy)[0, len(prompt):].astype(np.uint8)).decode("utf-8", errors="replace")
    assert "".join(pieces) == want


def test_without_run_it_uses_the_latest_run(tmp_path, run, capsys, monkeypatch):
    path, params = run
    older = tmp_path / "runs" / "older"
    older.mkdir(parents=True)
    checkpoint.save_config(older, CFG)  # config only: would fail to load if chosen
    os.utime(older, (0, 0))
    (tmp_path / "runs" / "latest").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--prompt", "小猫", "--max-new-tokens", str(N), "--chunk", "6"]) == 0
    assert "latest" in capsys.readouterr().out


def _corrupt_run(tmp_path) -> Path:
    corrupt = tmp_path / "corrupt"
    _make_run(corrupt)
    for f in (corrupt / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    return corrupt


def _refused(argv, capsys, match):
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sample.py: ") and match in err, err


def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, run, capsys):
    path, _ = run
    _refused(["--run", str(path), "--prompt", "x" * 48], capsys, "context is 48")
    _refused(["--run", str(path), "--prompt", "x" * 40, "--max-new-tokens", "10"], capsys, "--max-new-tokens 8")
    _refused(["--run", str(path), "--prompt", "a", "--max-new-tokens", "5", "--top-p", "1.5"], capsys, "top_p")
    _refused(["--run", str(tmp_path / "nowhere"), "--prompt", "a"], capsys, "does not exist")
    _refused(["--runs-dir", str(tmp_path / "empty"), "--prompt", "a"], capsys, "no run directory")

    _refused(["--run", str(_corrupt_run(tmp_path)), "--prompt", "a"], capsys, "corrupt")

    small_vocab = tmp_path / "small_vocab"  # a byte tokenizer feeding a model of V = 200
    _make_run(small_vocab, CFG.replace(vocab_size=200))
    _refused(["--run", str(small_vocab), "--prompt", "小猫"], capsys, "outside the vocabulary")

    chars = tmp_path / "chars"
    _make_run(chars, CFG, make_tokenizer("char", "abc"))
    _refused(["--run", str(chars), "--prompt", "小猫"], capsys, "小")


def test_command_line_error_is_one_line_on_stderr(tmp_path):
    command = [sys.executable, str(ROOT / "sample.py"), "--run", str(_corrupt_run(tmp_path)), "--prompt", "a"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "corrupt" in done.stderr, done.stderr
