"""Two processes on localhost (JAX's CPU collectives, 2 devices each) train like one process on 4 devices.

The test launches this file as a script: `python tests/test_multiprocess.py WORKDIR
COORDINATOR NUM_PROCESSES PROCESS_ID` joins the run through `jax.distributed`, trains a
few steps on a (data=2, fsdp=2) mesh, feeding only its own rows of each global batch,
saves the state collectively with Orbax, and (process 0 only) writes the losses.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from llmfn import checkpoint, sharding
from llmfn.config import Config
from llmfn.model import init
from llmfn.train import init_state, make_optimizer, make_train_step

STEPS, B, T = 4, 8, 16
CFG = Config(vocab_size=64, context=T, n_layers=2, d_model=32, n_heads=4)
OPT = make_optimizer(1e-2, steps=STEPS, warmup=1)


def fresh_state(seed):
    """The train state every run starts from; a traced seed, so it can be built sharded."""
    return init_state(init(CFG, jax.random.key(seed)), OPT, jax.random.key(seed + 1))


def train(mesh):
    """Losses and final state of STEPS updates on `mesh`, each process feeding its own rows."""
    state, shardings = sharding.sharded_init(fresh_state, mesh, 0)
    ins, outs = sharding.step_shardings(shardings, mesh)
    step = make_train_step(CFG, OPT, in_shardings=ins, out_shardings=outs)
    starts = np.random.default_rng(0).integers(0, CFG.vocab_size, (STEPS, B, 1))
    tokens = ((starts + np.arange(T + 1)) % CFG.vocab_size).astype(np.int32)  # (STEPS, B, T + 1), every process
    losses = []
    for batch in tokens:
        rows = sharding.local_rows(batch, mesh)  # (B / processes, T + 1)
        inputs, targets = (sharding.make_global_batch(x, mesh) for x in (rows[:, :-1], rows[:, 1:]))
        state, metrics = step(state, inputs, targets)
        losses.append(float(metrics["loss"]))
    return losses, state


def worker(workdir: Path, coordinator: str, num_processes: int, process_id: int) -> None:
    """One process of the run: join it, train on the global mesh, save collectively."""
    sharding.initialize(coordinator, num_processes, process_id)
    losses, state = train(sharding.make_mesh("data=2,fsdp=2"))
    checkpoint.save(checkpoint.manager(workdir), state)  # collective: every process calls it
    if jax.process_index() == 0:
        (workdir / "losses.json").write_text(json.dumps({"losses": losses, "devices": jax.device_count()}))


def launch(workdir: Path, num_processes: int, devices_per_process: int) -> list[subprocess.Popen]:
    """Start `num_processes` workers on localhost, each seeing `devices_per_process` CPU devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(workdir), f"127.0.0.1:{port}", str(num_processes), str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(num_processes)
    ]


def wait(procs: list[subprocess.Popen]) -> None:
    """Wait for every worker; fail with the output of the first that did not exit cleanly."""
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def test_two_processes_train_like_one_with_four_devices(tmp_path):
    procs = launch(tmp_path, num_processes=2, devices_per_process=2)
    want_losses, want = train(sharding.make_mesh("data=2,fsdp=2", devices=jax.devices()[:4]))  # meanwhile
    wait(procs)
    got = json.loads((tmp_path / "losses.json").read_text())
    assert got["devices"] == 4
    assert want_losses[-1] < want_losses[0] - 0.05  # it really trains
    np.testing.assert_allclose(got["losses"], want_losses, rtol=2e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "losses.json"]  # one log, from process 0

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), jax.eval_shape(fresh_state, 0))
    saved = checkpoint.restore(checkpoint.manager(tmp_path), like)
    assert int(saved["step"]) == STEPS
    for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
