"""Checkpoints: exact round trips, the latest K kept, a failed save leaves the previous
one usable, and `load` restores onto one device what eight devices saved."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import llmfn
from llmfn import checkpoint, train
from llmfn.tokenizer import make_tokenizer

CFG = llmfn.Config(vocab_size=256, context=16, n_layers=2, d_model=32, n_heads=2)


OPT = train.make_optimizer(1e-2, steps=10, warmup=1)
STEP = train.make_train_step(CFG, OPT)


def _state(seed=0, steps=0):
    """A train state after `steps` real updates, so the optimizer moments are non-zero."""
    state = train.init_state(llmfn.init(CFG, jax.random.key(seed)), OPT, jax.random.key(seed + 7))
    tokens = jax.random.randint(jax.random.key(seed), (2, 17), 0, CFG.vocab_size)
    for _ in range(steps):
        state, _ = STEP(state, tokens[:, :-1], tokens[:, 1:])
    return state


def _assert_same(a, b):
    a, b = jax.tree.map(_plain, a), jax.tree.map(_plain, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _plain(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def test_restore_gives_back_exactly_what_was_saved(tmp_path):
    saved = _state(steps=2)
    mngr = checkpoint.manager(tmp_path)
    assert checkpoint.restore(mngr, _state(seed=1)) is None
    checkpoint.save(mngr, saved)
    restored = checkpoint.restore(checkpoint.manager(tmp_path), _state(seed=1))
    _assert_same(restored, saved)
    assert int(restored["step"]) == 2


def test_only_the_latest_k_are_kept(tmp_path):
    mngr = checkpoint.manager(tmp_path, keep=2)
    state = _state()
    for step in (1, 2, 3, 4):
        checkpoint.save(mngr, state | {"step": jnp.asarray(step, jnp.int32)})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
    assert int(checkpoint.restore(checkpoint.manager(tmp_path), state)["step"]) == 4


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path):
    good = _state(steps=1)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, good)
    broken = good | {"step": jnp.asarray(2, jnp.int32), "opt_state": {"not an array": object()}}
    with pytest.raises(Exception):
        checkpoint.save(mngr, broken)  # params are written, then the optimizer state fails
    assert [p.name for p in (tmp_path / "checkpoints").glob("2.*")] == ["2.orbax-checkpoint-tmp"]  # half-written
    restored = checkpoint.restore(checkpoint.manager(tmp_path), _state(seed=3))
    assert int(restored["step"]) == 1
    _assert_same(restored, good)


def test_config_round_trip_and_clear_errors(tmp_path):
    cfg = CFG.replace(norm="rmsnorm", n_kv_heads=1)
    checkpoint.save_config(tmp_path, cfg)
    assert checkpoint.read_config(tmp_path) == cfg
    with pytest.raises(ValueError, match="not a run directory"):
        checkpoint.read_config(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load(tmp_path)


def test_load_on_one_device_what_eight_devices_saved(tmp_path):
    assert jax.device_count() == 8
    state = _state(steps=1)
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()))  # noqa: E731
    state = state | {"params": jax.tree.map(shard, state["params"])}
    assert state["params"]["embed"].sharding.num_devices == 8
    checkpoint.save_config(tmp_path, CFG)
    make_tokenizer("byte").save(tmp_path)
    checkpoint.save(checkpoint.manager(tmp_path), state)
    want = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state["params"])}
    np.savez(tmp_path / "want.npz", **want)

    script = (
        "import sys, jax, numpy as np, llmfn.checkpoint as c\n"
        "cfg, params, tok = c.load(sys.argv[1])\n"
        "assert jax.device_count() == 1 and tok.kind == 'byte' and cfg.n_layers == 2\n"
        "want = np.load(sys.argv[1] + '/want.npz')\n"
        "got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}\n"
        "assert sorted(got) == sorted(want.files)\n"
        "assert all(np.array_equal(got[k], want[k]) for k in got)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
