"""How fast can XLA on this machine read a GPT-2's weights one matrix-vector product at a time?

    python bench/decode_ceiling.py

A decode step at batch 1 is, at heart, one matrix-vector product per weight matrix. This
times exactly that and nothing else (no attention, norms, cache or sampling) for the
matrices of a GPT-2-124M: per layer q/k/v fused (D x 3D), o (D x D), up (D x 4D), down
(4D x D), then the tied head (V x D), in a jitted `lax.scan` of decode-like steps, each
step's input depending on the last step's output. Both layouts: (in, out) as θ stores
them, and (out, in) as `llmfn.generate` rearranges them. Also one product against the
head alone. Rates are bytes of weights read per second, against the copy bandwidth
measured in the same run, so they bound what `bench/generate.py` can show as "% of bound".
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import copy_bytes_per_s, cores, interleaved  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    steps: int = 16  # decode-like steps per timed call
    repeats: int = 5
    layers: int = 12  # L (GPT-2-124M: 12)
    width: int = 768  # D (768); the MLP is 4 D wide
    vocab: int = 50257  # V (50257)


def weights(args: Args, out_in: bool) -> tuple[list, jax.Array]:
    """Random matrices shaped like GPT-2's: L layers of (qkv, o, up, down), and the (V, D) head."""
    D, F, V, L = args.width, 4 * args.width, args.vocab, args.layers
    key = jax.random.key(0)
    shapes = [(D, 3 * D), (D, D), (D, F), (F, D)]
    layers = []
    for layer in range(L):
        keys = jax.random.split(jax.random.fold_in(key, layer), 4)
        mats = [jax.random.normal(k, s[::-1] if out_in else s) * 0.02 for k, s in zip(keys, shapes)]
        layers.append(mats)
    return layers, jax.random.normal(jax.random.fold_in(key, L), (V, D)) * 0.02


def chain(args: Args, out_in: bool):
    """A blocking callable running `args.steps` chained decode-like steps, and the weight bytes per step."""
    layers, head = weights(args, out_in)
    D = args.width
    mv = (lambda x, w: jnp.einsum("bi,oi->bo", x, w)) if out_in else (lambda x, w: x @ w)  # noqa: E731

    @jax.jit
    def run(x, layers, head):
        def step(x, _):
            for qkv, o, up, down in layers:
                x = x + mv(mv(x, qkv)[:, :D], o)
                x = x + mv(jnp.tanh(mv(x, up)), down)
            logits = jnp.einsum("bd,vd->bv", x, head)  # (1, V)
            return x + 1e-3 * logits[:, :D], None
        return jax.lax.scan(step, x, length=args.steps)[0]

    x = jnp.ones((1, D)) * 0.01
    nbytes = sum(w.nbytes for mats in layers for w in mats) + head.nbytes
    return (lambda: run(x, layers, head).block_until_ready()), nbytes


def main(args: Args) -> None:
    if min(args.steps, args.repeats, args.layers, args.width, args.vocab) <= 0:
        print("decode_ceiling: steps, repeats, layers, width and vocab must be positive", file=sys.stderr)
        raise SystemExit(2)
    bandwidth = copy_bytes_per_s()
    fns, nbytes = {}, {}
    for name, out_in in (("(in, out)", False), ("(out, in)", True)):
        fns[name], nbytes[name] = chain(args, out_in)
    _, head = weights(args, True)
    x = jnp.ones((1, args.width))
    head_mv = jax.jit(lambda x, w: jnp.einsum("bd,vd->bv", x, w))
    fns["head alone"], nbytes["head alone"] = (lambda: head_mv(x, head).block_until_ready()), head.nbytes
    seconds = interleaved(fns, repeats=args.repeats)
    print(f"{cores()} cores | jax {jax.__version__} | L={args.layers} D={args.width} V={args.vocab} "
          f"| copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name, t in seconds.items():
        per_step = t / (1 if name == "head alone" else args.steps)
        rate = nbytes[name] / per_step
        print(f"{name:11s} {1e3 * per_step:7.2f} ms per step  {rate / 1e9:5.1f} GB/s  "
              f"ratio of copy bandwidth: {rate / bandwidth:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
