"""Checkpoints: the only module that imports orbax.

A run directory holds
  config.json      the model Config (plain JSON)
  tokenizer.json   the tokenizer (written by `Tokenizer.save`)
  checkpoints/<step>/{params, opt_state, extra}   Orbax, one folder per saved step
Orbax writes each step into a temporary folder and renames it when complete, so a run
killed mid-save still has its previous checkpoint; the latest `keep` steps are kept.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from .config import Config
from .files import atomic_write
from .model import Params, param_shapes
from .tokenizer import load_tokenizer

CONFIG_FILE = "config.json"


def save_config(run_dir, cfg: Config) -> None:
    """Writes `cfg` to run_dir/config.json (creating run_dir)."""
    with atomic_write(Path(run_dir) / CONFIG_FILE) as f:
        f.write(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def read_config(run_dir) -> Config:
    """The Config stored in run_dir/config.json."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {run_dir} is not a run directory written by train.py")
    fields = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Config)}
    if set(fields) - known:
        raise ValueError(f"{path} has unknown fields {sorted(set(fields) - known)}: was it written by another version?")
    return Config(**fields)


def manager(run_dir, keep: int = 3) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager on run_dir/checkpoints keeping the latest `keep` steps.

    Saves are synchronous (the train step donates the state's buffers right after) and
    collective: in a multi-process run every process calls `save` and `restore`.
    """
    if keep <= 0:
        raise ValueError(f"keep must be at least 1 checkpoint, got {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(run_dir, "checkpoints").absolute(), options=options)


def save(mngr: ocp.CheckpointManager, state: dict) -> None:
    """Saves a train state {"params", "opt_state", "step", "rng"} under its own step number."""
    extra = {"step": state["step"], "rng": jax.random.key_data(state["rng"])}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        extra=ocp.args.StandardSave(extra),
    )
    mngr.save(int(state["step"]), args=args, force=True)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like: dict) -> dict | None:
    """The latest saved train state, laid out like `like` (same tree, shapes and shardings).

    `like` may hold arrays or `jax.ShapeDtypeStruct`s with shardings (e.g. from
    `jax.eval_shape`); returns None when no checkpoint exists yet.
    """
    step = mngr.latest_step()
    if step is None:
        return None
    target = jax.tree.map(_abstract, {k: like[k] for k in ("params", "opt_state", "step")})
    rng_data = jax.eval_shape(jax.random.key_data, like["rng"])  # (2,) uint32 for the default key
    rng_like = jax.ShapeDtypeStruct(rng_data.shape, rng_data.dtype, sharding=_abstract(like["rng"]).sharding)
    extra_like = {"step": target["step"], "rng": rng_like}  # the key data goes where the key goes
    got = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        extra=ocp.args.StandardRestore(extra_like),
    ))
    impl = jax.random.key_impl(jnp.zeros((), like["rng"].dtype))  # works for a ShapeDtypeStruct too
    rng = jax.random.wrap_key_data(got["extra"]["rng"], impl=impl)
    return {"params": got["params"], "opt_state": got["opt_state"], "step": got["extra"]["step"], "rng": rng}


def load(run_dir, sharding: jax.sharding.Sharding | None = None):
    """(cfg, params, tokenizer) from the latest checkpoint of a run directory.

    Params are placed with `sharding` (default: the first local device), whatever
    device count the checkpoint was saved from.
    """
    cfg = read_config(run_dir)
    mngr = ocp.CheckpointManager(Path(run_dir, "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step()
    if step is None:
        raise ValueError(f"{run_dir} holds no checkpoint yet: train it with `python train.py --out-dir {run_dir}`")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), param_shapes(cfg))
    params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    mngr.close()
    return cfg, params, load_tokenizer(run_dir)


def _abstract(x) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
