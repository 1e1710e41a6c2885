"""train.py end to end on a tiny model: the run directory, bad input, a NaN stop, and a
SIGKILLed run that resumes bit-identical to an uninterrupted one."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llmfn import checkpoint

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
cli = sys.modules["train_cli"] = importlib.util.module_from_spec(_spec)  # tyro reads the source of Args
_spec.loader.exec_module(cli)

TINY = ["--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--context", "32", "--batch-size", "4",
        "--tokenizer", "byte", "--corpus-bytes", "20000", "--eval-batches", "1", "--warmup", "1"]


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_short_run_writes_metrics_plot_checkpoint_and_samples(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _main(TINY + ["--out-dir", run, "--steps", 6, "--log-every", 2, "--eval-every", 3,
                                   "--ckpt-every", 3, "--samples", 2, "--tensorboard"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "loss" in r for r in records)
    assert [r["step"] for r in records if "grad_norm" in r] == [2, 4, 6]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert {"val_loss", "val_bpb", "val_ppl", "bound_bpb"} <= set(r)
        np.testing.assert_allclose(r["val_bpb"], r["val_loss"] / np.log(2), rtol=1e-6)  # byte tokenizer: 1 byte/token
    assert all(np.isfinite(r["loss"]) for r in records)
    assert 0 <= records[-1]["fact_recall"] <= 1
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tensorboard").iterdir())
    assert "samples:" in out and "the capital of france is" in out and "final (step 6)" in out
    assert "step 6: loss" in out
    cfg, params, tokenizer = checkpoint.load(run)
    assert cfg.n_layers == 1 and tokenizer.kind == "byte"
    assert checkpoint.manager(run).latest_step() == 6


def _bad(tmp_path, name: str, content: bytes | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("flags, message", [
    (["--data", "MISSING"], "MISSING"),
    (["--data", "EMPTY"], "empty"),
    (["--data", "LATIN1"], "UTF-8"),
    (["--data", "SHORT"], "tokens"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--warmup", "600"], "--warmup"),
    (["--accum", "3"], "--accum"),
    (["--n-heads", "3"], "divisible"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, flags, message):
    files = {"MISSING": None, "EMPTY": b"", "LATIN1": "café".encode("latin-1") * 100, "SHORT": b"too short"}
    flags = [str(_bad(tmp_path, f, files[f])) if f in files else f for f in flags]
    code, out, err = _main(TINY + ["--out-dir", tmp_path / "run"] + flags, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: ") and message in err, err


@pytest.mark.parametrize("flags", [["--steps", "x"], ["--preset", "nope"], ["--bogus"]])
def test_unparsable_flags_are_one_line_and_exit_code_2(capsys, flags):
    with pytest.raises(SystemExit) as exit:
        cli.main(flags)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "--help" in err, err


def test_a_run_dir_made_with_other_flags_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _main(TINY + ["--out-dir", run, "--steps", 2, "--samples", 0], capsys)[0] == 0
    code, _, err = _main(TINY + ["--out-dir", run, "--steps", 2, "--lr", "0.01", "--samples", 0], capsys)
    assert code == 2 and "--lr" in err and err.count("\n") == 1
    code, _, err = _main([a if a != "32" else "64" for a in TINY] + ["--out-dir", run, "--steps", 2], capsys)
    assert code == 2 and err.count("\n") == 1


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """lr 1e30: the first update is finite but huge, so the next loss overflows."""
    run = tmp_path / "run"
    code, _, err = _main(TINY + ["--out-dir", run, "--steps", 10, "--lr", "1e30", "--warmup", 0, "--ckpt-every", 1], capsys)
    assert code == 1 and "stopped" in err and "checkpoint (step 1)" in err, err
    assert checkpoint.manager(run).latest_step() == 1
    _, params, _ = checkpoint.load(run)
    assert all(bool(np.isfinite(leaf).all()) for leaf in jax.tree.leaves(params))


def test_the_process_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "nothing.txt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "nothing.txt" in result.stderr


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, TINY), "--out-dir", str(run),
                             "--steps", "100000", "--log-every", "2", "--ckpt-every", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "resume" in err, err
    assert checkpoint.manager(run).latest_step() >= 2


def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, capsys):
    flags = TINY + ["--steps", 40, "--ckpt-every", 5, "--eval-every", 1000, "--samples", 0, "--keep", 50]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not any(p.name.isdigit() for p in (killed / "checkpoints").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.manager(killed).latest_step()
    assert killed_at is not None and killed_at < 40, "the run finished before it was killed"

    assert _main(flags + ["--out-dir", killed], capsys)[0] == 0
    assert _main(flags + ["--out-dir", reference], capsys)[0] == 0
    _, resumed, _ = checkpoint.load(killed)
    _, uninterrupted, _ = checkpoint.load(reference)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)
