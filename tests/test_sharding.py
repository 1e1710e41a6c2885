"""Sharded training on the 8 virtual CPU devices matches one device; checkpoints move between meshes."""

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llmfn import checkpoint
from llmfn.config import Config
from llmfn.model import init
from llmfn.sharding import (
    any_process,
    barrier,
    batch_sharding,
    gather,
    initialize,
    local_rows,
    make_global_batch,
    make_mesh,
    place_batch,
    sharded_init,
    state_shardings,
    step_shardings,
)
from llmfn.train import init_state, make_optimizer, make_train_step

CFG = Config(vocab_size=64, context=16, n_layers=2, d_model=32, n_heads=4)
STEPS, B, T = 10, 16, 16
OPT = make_optimizer(1e-2, steps=STEPS, warmup=2)


def fresh_state(seed):
    """The train state every run starts from; a traced seed, so it can be built sharded."""
    return init_state(init(CFG, jax.random.key(seed)), OPT, jax.random.key(seed + 1))


def batches():
    """(inputs, targets) NumPy pairs, (B, T) each, the same for every run: counting mod V."""
    starts = np.random.default_rng(0).integers(0, CFG.vocab_size, (STEPS, B, 1))
    tokens = ((starts + np.arange(T + 1)) % CFG.vocab_size).astype(np.int32)  # (STEPS, B, T + 1)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def train(mesh, accum=1):
    """Losses and final state of STEPS updates on one device (mesh None) or on `mesh`."""
    if mesh is None:
        state, step = jax.jit(fresh_state)(0), make_train_step(CFG, OPT, accum)
    else:
        state, shardings = sharded_init(fresh_state, mesh, 0)
        ins, outs = step_shardings(shardings, mesh)
        step = make_train_step(CFG, OPT, accum, in_shardings=ins, out_shardings=outs)
    losses = []
    for inputs, targets in batches():
        state, metrics = step(state, make_global_batch(inputs, mesh), make_global_batch(targets, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single():
    return train(None)


@pytest.mark.parametrize("spec, accum", [("data=4,fsdp=2", 1), ("fsdp=8", 2)])
def test_sharded_training_matches_one_device(single, spec, accum):
    """Two micro-batches of 8 rows on 8 devices give the update of the whole 16-row batch."""
    mesh = make_mesh(spec)
    losses, state = train(mesh, accum=accum)
    ref_losses, ref_state = single
    assert losses[-1] < losses[0] - 0.05  # it really trains
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    fsdp = mesh.shape["fsdp"]
    embed = state["params"]["embed"]
    assert embed.sharding.spec == P("fsdp", None)
    assert embed.addressable_shards[0].data.shape == (CFG.vocab_size // fsdp, CFG.d_model)
    big = [x for x in jax.tree.leaves(state) if x.size >= 1024]
    big_params = [x for x in jax.tree.leaves(state["params"]) if x.size >= 1024]
    assert len(big_params) >= 5 and len(big) == 3 * len(big_params)
    for x in big:  # θ, Adam's mu and nu: every large array is split over fsdp
        assert not x.sharding.is_fully_replicated
        assert x.addressable_shards[0].data.size == x.size // fsdp


def test_sharding_rule_picks_the_largest_divisible_axis():
    mesh = make_mesh("data=2,fsdp=4")
    tree = {
        "scalar": jax.ShapeDtypeStruct((), np.int32),
        "small": np.zeros((4, 8), np.float32),  # under MIN_SHARDED_SIZE
        "tall": np.zeros((256, 32), np.float32),
        "wide": np.zeros((6, 32, 512), np.float32),
        "tie": np.zeros((64, 64), np.float32),
        "odd": np.zeros((7, 333), np.float32),  # no axis divisible by 4
    }
    specs = {k: s.spec for k, s in state_shardings(tree, mesh).items()}
    assert specs == {
        "scalar": P(), "small": P(), "tall": P("fsdp", None), "wide": P(None, None, "fsdp"),
        "tie": P("fsdp", None), "odd": P(),
    }


def test_batch_is_split_over_every_device():
    mesh = make_mesh("data=4,fsdp=2")
    rows = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    batch = make_global_batch(local_rows(rows, mesh), mesh)
    assert batch.sharding == batch_sharding(mesh) and batch.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(batch), rows)
    with pytest.raises(ValueError, match="multiple of the device count"):
        make_global_batch(rows[:12], mesh)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=3", "has 3 devices but there are 8"),
        ("data=4,fsdp=4", "has 16 devices but there are 8"),
        ("model=8", "unknown mesh axis 'model'"),
        ("data", "bad mesh spec"),
        ("data=four", "bad mesh spec"),
        ("data=0,fsdp=8", "bad mesh spec"),
        ("data=4,,fsdp=2", "bad mesh spec"),
        ("fsdp=2,fsdp=4", "given twice"),
    ],
)
def test_bad_mesh_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        make_mesh(spec)
    assert "\n" not in str(err.value)


def test_a_batch_that_does_not_split_is_replicated():
    mesh = make_mesh("fsdp=8")
    rows = np.arange(12 * 3, dtype=np.int32).reshape(12, 3)  # e.g. the short last validation batch
    for n, replicated in ((16, False), (12, True)):
        batch = place_batch(np.resize(rows, (n, 3)), mesh)
        assert batch.sharding.is_fully_replicated == replicated and len(batch.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(batch), np.resize(rows, (n, 3)))


def test_one_device_and_one_process_pay_nothing():
    assert make_mesh("") is None
    rows = np.ones((3, 2), np.int32)
    assert local_rows(rows, None) is rows
    assert make_global_batch(rows, None).sharding.is_fully_replicated
    assert place_batch(rows, None).sharding.is_fully_replicated
    tree = {"a": rows}
    barrier("nothing to wait for")
    assert gather(tree) is tree and any_process(True) and not any_process(False)


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "data=3"], "has 3 devices but there are 8"),
    (["--mesh", "tp=8"], "unknown mesh axis 'tp'"),
    (["--mesh", "fsdp=8", "--batch-size", "12"], "--batch-size 12 does not split over the 8 devices"),
])
def test_train_cli_refuses_a_mesh_it_cannot_use_in_one_line(tmp_path, capsys, flags, message):
    if "train_cli" not in sys.modules:  # tyro reads the source of train.py's Args
        spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).parents[1] / "train.py")
        sys.modules["train_cli"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["train_cli"])
    code = sys.modules["train_cli"].main(["--out-dir", str(tmp_path), "--tokenizer", "byte", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_initialize_without_arguments_or_launcher_is_a_no_op(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    initialize(None, None, None)
    assert not jax.distributed.is_initialized()


def random_like(abstract, shardings, seed):
    """A state shaped like `abstract` with a distinct random value in every leaf, placed by `shardings`."""
    gen = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda a: gen.normal(size=a.shape).astype(a.dtype) if a.dtype == np.float32 else np.full(a.shape, 7, a.dtype),
        {k: v for k, v in abstract.items() if k != "rng"},
    )
    return {**jax.device_put(values, {k: v for k, v in shardings.items() if k != "rng"}),
            "rng": jax.device_put(jax.random.key(seed), shardings["rng"])}


def test_checkpoint_from_four_devices_restores_onto_one_and_eight(tmp_path):
    abstract = jax.eval_shape(fresh_state, 0)
    mesh4 = make_mesh("data=2,fsdp=2", devices=jax.devices()[:4])
    saved = random_like(abstract, state_shardings(abstract, mesh4), seed=3)
    assert saved["params"]["embed"].addressable_shards[0].data.shape == (CFG.vocab_size // 2, CFG.d_model)
    want = jax.tree.map(np.asarray, {**saved, "rng": jax.random.key_data(saved["rng"])})
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, saved)

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for shardings in (jax.tree.map(lambda _: one, abstract), state_shardings(abstract, make_mesh("fsdp=8"))):
        like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        got = checkpoint.restore(mngr, like)
        assert jax.tree.map(lambda x: x.sharding, got) == shardings
        got = {**got, "rng": jax.random.key_data(got["rng"])}
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), want)
