"""Time to first step of llmfn's train step, with and without `lax.scan` over layers.

    python bench/compile_time.py                  # GPT-2-124M size: 12 layers, width 768, V 50257
    python bench/compile_time.py --steady 3       # also 3 interleaved steady-state steps of each
    python bench/compile_time.py --model tiny     # smoke run (seconds)

Time to first step = trace + XLA compile + the first execution, what a user waits for
after starting `train.py`. Under scan the compiler sees one layer; unrolled it sees L,
so compile time grows with depth. The steady-state steps that follow are timed in
alternation, so the scan/unrolled ratio holds on a busy machine.
"""

import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import cores, interleaved  # noqa: E402
from llmfn import Config, init, param_count, presets  # noqa: E402
from llmfn.train import init_state, make_optimizer, make_train_step  # noqa: E402

MODELS = {
    "gpt2": presets["gpt2"],
    "tiny": Config(vocab_size=64, context=32, n_layers=2, d_model=32, n_heads=2),
}


@dataclasses.dataclass(frozen=True)
class Args:
    model: str = "gpt2"  # a name in MODELS
    batch: int = 1  # B
    seq: int | None = None  # T tokens per row; None: min(256, the model's context)
    steady: int = 0  # if > 0, also time this many steady-state steps of each, interleaved


def first_step(cfg: Config, inputs, targets) -> tuple[dict, float, float]:
    """Builds a train state and runs one step: → (runner for more steps, compile s, first-step s)."""
    optimizer = make_optimizer(3e-4, steps=10**6, warmup=10)
    holder = {"state": init_state(init(cfg, jax.random.key(0)), optimizer, jax.random.key(1))}
    jax.block_until_ready(holder["state"])
    start = time.perf_counter()
    step = make_train_step(cfg, optimizer).lower(holder["state"], inputs, targets).compile()
    compiled = time.perf_counter()
    holder["state"], metrics = step(holder["state"], inputs, targets)
    metrics["loss"].block_until_ready()
    done = time.perf_counter()

    def run():
        holder["state"], metrics = step(holder["state"], inputs, targets)
        metrics["loss"].block_until_ready()

    return run, compiled - start, done - start


def main(args: Args) -> None:
    if args.model not in MODELS:
        print(f"compile_time: unknown model {args.model!r} (choose from {', '.join(MODELS)})", file=sys.stderr)
        raise SystemExit(2)
    cfg = MODELS[args.model]
    seq = min(256, cfg.context) if args.seq is None else args.seq
    if not 0 < seq <= cfg.context or args.batch <= 0 or args.steady < 0:
        print(f"compile_time: need 0 < seq <= {cfg.context}, batch > 0 and steady >= 0", file=sys.stderr)
        raise SystemExit(2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, seq + 1), dtype=np.int32)
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    print(f"jax {jax.__version__} ({jax.default_backend()}), {cores()} cores; {args.model}: L={cfg.n_layers} "
          f"D={cfg.d_model} V={cfg.vocab_size}, {param_count(cfg):,} params, batch {args.batch}x{seq}")
    runners, first = {}, {}
    for name, scan in (("scan", True), ("unrolled", False)):
        runners[name], compile_s, first[name] = first_step(cfg.replace(scan_layers=scan), inputs, targets)
        print(f"{args.model} {name:9s} compile {compile_s:6.1f} s, time to first step {first[name]:6.1f} s")
    print(f"{args.model} ratio unrolled/scan time to first step: {first['unrolled'] / first['scan']:.2f}x")
    if args.steady:
        seconds = interleaved(runners, repeats=args.steady, warmup=0)
        for name, t in seconds.items():
            print(f"{args.model} {name:9s} steady {t * 1e3:9.1f} ms/step")
        print(f"{args.model} ratio scan/unrolled steady tokens/s: {seconds['unrolled'] / seconds['scan']:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
