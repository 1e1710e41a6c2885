"""train.py over several processes (`jax.distributed`, JAX's gloo CPU collectives on localhost).

Two processes with 2 devices each train exactly like one process with 4: same losses,
same validation, same θ, one log; a half-given cluster is a one-line error.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from llmfn import checkpoint, corpus

ROOT = Path(__file__).parents[1]
STEPS = 4
FLAGS = [
    "--tokenizer", "byte", "--context", "32", "--n-layers", "2", "--d-model", "32",
    "--n-heads", "4", "--steps", str(STEPS), "--warmup", "1", "--batch-size", "8", "--accum", "2",
    "--log-every", "1", "--eval-every", "2", "--eval-batches", "4",  # 31 windows: 8, 8, 8 and a short 7
    "--ckpt-every", "2",
    "--mesh", "data=2,fsdp=2",
]


def start(out_dir: Path, devices: int, extra: list[str], log: Path) -> subprocess.Popen:
    """train.py in a fresh process that sees `devices` CPU devices; output to `log`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FLAGS, "--out-dir", str(out_dir), *extra],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    text = tmp_path / "text.txt"  # the built-in corpus as a plain file: no fact-recall pass at the end
    text.write_text(corpus.generate(20_000))
    cluster = ["--data", str(text), "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--samples", "1"]
    logs = [tmp_path / f"{name}.log" for name in ("p0", "p1", "single")]
    procs = [
        start(two, 2, [*cluster, "--process-id", "0"], logs[0]),
        start(two, 2, [*cluster, "--process-id", "1"], logs[1]),
        start(one, 4, ["--data", str(text), "--samples", "0"], logs[2]),  # its samples are not compared
    ]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0], "\n".join(log.read_text()[-2000:] for log in logs)

    got, want = records(two), records(one)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # one log, written by process 0 alone
    assert [r["step"] for r in got if "grad_norm" in r] == [1, 2, 3, 4]  # a log record per step
    assert [r["val_loss"] for r in want if "val_loss" in r][-1] < want[0]["loss"]  # it learns
    for key in ("loss", "grad_norm", "val_loss", "val_bpb"):
        np.testing.assert_allclose([r[key] for r in got if key in r], [r[key] for r in want if key in r], rtol=2e-5)
    printed = [log.read_text() for log in logs]
    assert "final (step 4)" in printed[0] and "samples:" in printed[0]
    assert "step 1: loss" not in printed[1] and "final" not in printed[1]

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on 2 × 2 devices, read on one
    (_, got_params, _), (_, want_params, _) = (checkpoint.load(d, device) for d in (two, one))
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_a_process_id_without_a_coordinator_is_one_line_and_exit_code_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out-dir", str(tmp_path), "--process-id", "1"],
                          cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("train.py: cannot join a multi-process run") and "coordinator" in done.stderr
