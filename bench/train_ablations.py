"""What each training-speed choice is worth: the real train step with one piece swapped back.

    python bench/train_ablations.py                     # reference size and the small preset
    python bench/train_ablations.py --sizes tiny --repeats 1   # smoke run (seconds)

Variants, each traced with one piece of `llmfn.model` replaced for its trace only:
  llmfn            as shipped: causal attention by query blocks, remat keeping projections
  full-square      causal attention as one `jax.nn.dot_product_attention(is_causal=True)`
  remat-dots       remat keeping every matmul output (`dots_saveable`), attention scores too
  no-remat         no `nn.remat` around the layers
All are timed in alternation (same background load) and printed as llmfn's speed-up over each.
"""

import contextlib
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import interleaved  # noqa: E402
from bench.train_speed import SIZES, check_args  # noqa: E402
from llmfn import init, model  # noqa: E402
from llmfn.train import init_state, make_optimizer, make_train_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("ref", "small")  # names in bench/train_speed.py's SIZES
    batch: int = 8
    repeats: int = 6


@contextlib.contextmanager
def swapped(obj, name, value):
    """`obj.name = value` for the duration of the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def full_square(q, k, v, mask, with_weights):
    if mask is None and not with_weights and q.dtype == jnp.float32:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True), None
    return ATTEND(q, k, v, mask, with_weights)


ATTEND = model.attend
VARIANTS = {
    "llmfn": contextlib.nullcontext,
    "full-square": lambda: swapped(model, "attend", full_square),
    "remat-dots": lambda: swapped(jax.checkpoint_policies, "dots_with_no_batch_dims_saveable",
                                  jax.checkpoint_policies.dots_saveable),
    "no-remat": lambda: swapped(model.nn, "remat", lambda module, **_: module),
}


def bench(name: str, args: Args) -> None:
    cfg = SIZES[name]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, cfg.context + 1), dtype=np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    optimizer = make_optimizer(3e-4, steps=10**6, warmup=10)
    params = init(cfg, jax.random.key(0))
    steps = {}
    for variant, swap in VARIANTS.items():
        step = make_train_step(cfg, optimizer)
        holder = {"state": init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(1))}
        with swap():  # the first call traces the step with the piece swapped
            holder["state"], _ = step(holder["state"], inputs, targets)

        def train(step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], inputs, targets)
            metrics["loss"].block_until_ready()

        steps[variant] = train
    seconds = interleaved(steps, repeats=args.repeats, warmup=1)
    print(f"== {name}: L={cfg.n_layers} D={cfg.d_model} T={cfg.context} B={args.batch}")
    for variant, t in seconds.items():
        print(f"{name} {variant:12s} {t * 1e3:9.1f} ms/step")
    for variant in list(VARIANTS)[1:]:
        print(f"{name} ratio llmfn speed-up over {variant}: {seconds[variant] / seconds['llmfn']:.2f}x")


def main(args: Args) -> None:
    check_args("train_ablations", args.sizes, args.batch, args.repeats)
    for name in args.sizes:
        bench(name, args)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
