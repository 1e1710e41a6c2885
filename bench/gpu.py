"""GPU speed: a GPT-2-124M bfloat16 train step's MFU and decode tokens/s, on one accelerator.

    python bench/gpu.py           # on a CUDA machine with jax[cuda] installed
    python bench/gpu.py --tiny    # a tiny model on whatever JAX finds (CPU included): smoke run

MFU is printed twice: against the bfloat16 matmul rate measured in this run, and against
the datasheet dense bf16 peak when the device is one we know. Attention goes through
`jax.nn.dot_product_attention`, which picks cuDNN's fused kernel on GPUs where it applies.
Decode tokens/s comes from `llmfn.generate` (greedy, prefill included, compile excluded)
and is set against its bound: (copy bandwidth) / (bytes of θ read per decode step).
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
from bench.common import copy_bytes_per_s, matmul_chain, seconds, train_flops_per_token  # noqa: E402
from llmfn import Config, init, param_count, presets  # noqa: E402
from llmfn.generate import generate  # noqa: E402
from llmfn.train import init_state, make_optimizer, make_train_step  # noqa: E402

# Dense bf16 tensor-core peak FLOP/s from the vendor's datasheet; first matching name wins.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12))


@dataclasses.dataclass(frozen=True)
class Args:
    tiny: bool = False  # a 2-layer width-64 model and small batches: checks the script runs anywhere
    batch: int = 16  # B rows per train step
    seq: int = 1024  # T tokens per row
    decode_batch: int = 8  # rows decoded at once
    new_tokens: int = 256  # N tokens decoded per row after a 16-token prompt
    repeats: int = 10


def setup(args: Args) -> tuple[Config, Args, int]:
    """The config, the settings actually used, and the matmul size for the peak measurement."""
    if args.tiny:
        cfg = Config(vocab_size=256, context=64, n_layers=2, d_model=64, n_heads=4, dtype="bfloat16")
        return cfg, dataclasses.replace(args, batch=2, seq=64, decode_batch=2, new_tokens=16, repeats=2), 256
    return presets["gpt2"].replace(dtype="bfloat16"), args, 8192


def train_seconds(cfg: Config, args: Args) -> float:
    """Median seconds per train step (bf16 compute, f32 params and AdamW state)."""
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, cfg.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = make_optimizer(3e-4, steps=10**6, warmup=10)
    holder = {"state": init_state(init(cfg, jax.random.key(1)), optimizer, jax.random.key(2))}
    step = make_train_step(cfg, optimizer)

    def run():
        holder["state"], metrics = step(holder["state"], inputs, targets)
        metrics["loss"].block_until_ready()

    return seconds(run, args.repeats, warmup=2)


def decode_seconds(cfg: Config, args: Args) -> float:
    """Median seconds to generate `new_tokens` greedy tokens for `decode_batch` 16-token prompts."""
    params = init(cfg, jax.random.key(3))
    prompts = jax.random.randint(jax.random.key(4), (args.decode_batch, 16), 0, cfg.vocab_size)
    run = lambda: generate(params, prompts, jax.random.key(5), cfg, args.new_tokens, temperature=0.0)[0].block_until_ready()  # noqa: E731
    return seconds(run, args.repeats, warmup=1)


def main(args: Args) -> None:
    cfg, args, matmul_n = setup(args)
    if args.seq > cfg.context or args.new_tokens + 16 > cfg.context or min(args.batch, args.decode_batch, args.repeats) <= 0:
        print(f"gpu: need seq <= {cfg.context}, new_tokens + 16 <= {cfg.context} and positive sizes", file=sys.stderr)
        raise SystemExit(2)
    device = jax.devices()[0]
    print(f"{time.strftime('%Y-%m-%d')} jax {jax.__version__}, {device.platform}: {device.device_kind}; "
          f"{param_count(cfg):,} params, {cfg.dtype}")
    matmul, matmul_flops = matmul_chain(matmul_n, jnp.bfloat16)
    rate = matmul_flops / seconds(matmul, repeats=args.repeats)
    step_s = train_seconds(cfg, args)
    n_tokens = args.batch * args.seq
    achieved = train_flops_per_token(param_count(cfg), cfg.n_layers, cfg.d_model, args.seq) * n_tokens / step_s
    print(f"train: batch {args.batch}x{args.seq}, {step_s * 1e3:.1f} ms/step, {n_tokens / step_s:,.0f} tok/s, "
          f"{achieved / 1e12:.2f} TFLOP/s; bf16 matmul {rate / 1e12:.2f} TFLOP/s measured")
    print(f"ratio train MFU (of the measured bf16 matmul rate): {achieved / rate:.2f}")
    peak = next((flops for name, flops in DATASHEET_BF16 if name in device.device_kind), None)
    if peak is not None:
        print(f"ratio train MFU (of the {peak / 1e12:.0f} TFLOP/s datasheet peak): {achieved / peak:.2f}")
    decode_s = decode_seconds(cfg, args)
    decode_rate = args.decode_batch * args.new_tokens / decode_s
    bound = copy_bytes_per_s(megabytes=64 if args.tiny else 1024) / (param_count(cfg) * 2)  # bf16 weights per step
    print(f"decode: batch {args.decode_batch}, {args.new_tokens} new tokens, {decode_rate:,.0f} tok/s "
          f"({decode_rate / args.decode_batch:,.0f} steps/s)")
    print(f"ratio decode steps/s of the weight-read bound ({bound:,.0f} steps/s): {decode_rate / args.decode_batch / bound:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
