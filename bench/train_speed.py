"""Training speed: llmfn's train step against transformers' PyTorch GPT-2, side by side in one run.

    python bench/train_speed.py                      # reference size and the small preset
    python bench/train_speed.py --breakdown          # also forward and forward+backward alone
    python bench/train_speed.py --sizes tiny --repeats 1   # smoke run (seconds)

Both sides get the same config (float32, no dropout), the same batch of B rows of T tokens,
the same optimizer (global-norm clip 1.0, then AdamW) and the same CPU cores. The llmfn step
(scan over layers, and unrolled) and the PyTorch step are timed in alternation with an f32
matmul chain, so all of them see the same background load: the ratios printed are
meaningful on a busy machine even when the absolute figures are not.
MFU = tokens/s × FLOPs per token (6 N + 12 L D T) / the matmul rate measured in this run.
"""

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import cores, interleaved, matmul_chain, train_flops_per_token  # noqa: E402
from llmfn import Config, init, param_count, presets  # noqa: E402
from llmfn.train import init_state, loss_fn, make_optimizer, make_train_step  # noqa: E402

SIZES = {
    "ref": Config(vocab_size=256, context=256, n_layers=6, d_model=384, n_heads=6),
    "small": presets["small"],
    "tiny": Config(vocab_size=64, context=32, n_layers=2, d_model=32, n_heads=2),
}
LR, WEIGHT_DECAY, BETAS, CLIP = 3e-4, 0.1, (0.9, 0.95), 1.0


@dataclasses.dataclass(frozen=True)
class Args:
    sizes: tuple[str, ...] = ("ref", "small")  # names in SIZES
    batch: int = 8  # B rows of cfg.context tokens per step
    repeats: int = 5  # timed steps per contender (medians are printed)
    breakdown: bool = False  # also time forward alone and forward+backward alone
    matmul_n: int = 1024  # the f32 matmul chain is (n, n) @ (n, n)


def llmfn_contenders(cfg: Config, tokens: np.ndarray, breakdown: bool) -> dict:
    """name → blocking callable: llmfn's real train step (scan and unrolled), optionally fwd / fwd+bwd."""
    inputs, targets = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    optimizer = make_optimizer(LR, steps=10**6, warmup=10, weight_decay=WEIGHT_DECAY, clip=CLIP, b1=BETAS[0], b2=BETAS[1])
    params = init(cfg, jax.random.key(0))
    contenders = {}
    for name, scan in (("llmfn", True), ("llmfn-unrolled", False)):
        layer_cfg = cfg.replace(scan_layers=scan)
        step = make_train_step(layer_cfg, optimizer)
        holder = {"state": init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(1))}

        def train(step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], inputs, targets)
            metrics["loss"].block_until_ready()

        contenders[name] = train
    if breakdown:
        forward = jax.jit(lambda p: loss_fn(p, inputs, targets, cfg))
        backward = jax.jit(jax.grad(lambda p: loss_fn(p, inputs, targets, cfg)))
        contenders["llmfn fwd"] = lambda: forward(params).block_until_ready()
        contenders["llmfn fwd+bwd"] = lambda: jax.block_until_ready(backward(params))
    return contenders


def torch_contenders(cfg: Config, tokens: np.ndarray, breakdown: bool) -> dict:
    """name → callable: transformers' GPT2LMHeadModel train step (clip + AdamW), optionally fwd / fwd+bwd."""
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ff_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(tokens).long()
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss():
        logits = model(input_ids=inputs).logits  # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def train():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    contenders = {"torch": train}
    if breakdown:
        def forward():
            with torch.no_grad():
                loss()

        def forward_backward():
            loss().backward()
            model.zero_grad(set_to_none=True)

        contenders["torch fwd"] = forward
        contenders["torch fwd+bwd"] = forward_backward
    return contenders


def bench(name: str, cfg: Config, args: Args) -> None:
    """Times every contender for one config and prints absolute figures, then the ratios."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, cfg.context + 1), dtype=np.int32)
    matmul, matmul_flops = matmul_chain(args.matmul_n)
    contenders = {
        **llmfn_contenders(cfg, tokens, args.breakdown),
        **torch_contenders(cfg, tokens, args.breakdown),
        "matmul": matmul,
    }
    seconds = interleaved(contenders, repeats=args.repeats, warmup=1)
    n_tokens = args.batch * cfg.context
    rate = matmul_flops / seconds.pop("matmul")
    flops = train_flops_per_token(param_count(cfg), cfg.n_layers, cfg.d_model, cfg.context)
    print(f"== {name}: L={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads} T={cfg.context} V={cfg.vocab_size} "
          f"B={args.batch}, {param_count(cfg):,} params, {cores()} cores, f32 matmul {rate / 1e9:.1f} GFLOP/s")
    for contender, t in seconds.items():
        print(f"{name} {contender:16s} {t * 1e3:9.1f} ms/step {n_tokens / t:9.0f} tok/s")
    mfu = flops * n_tokens / seconds["llmfn"] / rate
    print(f"{name} ratio llmfn/torch tokens/s: {seconds['torch'] / seconds['llmfn']:.2f}x")
    print(f"{name} ratio llmfn MFU (of the measured f32 matmul rate): {mfu:.2f}")
    print(f"{name} ratio scan/unrolled tokens/s: {seconds['llmfn-unrolled'] / seconds['llmfn']:.2f}x")
    if args.breakdown:
        for side in ("llmfn", "torch"):
            print(f"{name} ratio {side} fwd+bwd/fwd time: {seconds[side + ' fwd+bwd'] / seconds[side + ' fwd']:.2f}x")


def check_args(program: str, sizes, batch: int, repeats: int) -> None:
    """One line on stderr and exit code 2 for an unknown size or a non-positive batch or repeat count."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or batch <= 0 or repeats <= 0:
        problem = f"unknown size {unknown[0]!r} (choose from {', '.join(SIZES)})" if unknown else "batch and repeats must be positive"
        print(f"{program}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def main(args: Args) -> None:
    check_args("train_speed", args.sizes, args.batch, args.repeats)
    torch.set_num_threads(cores())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, transformers {transformers.__version__}")
    for name in args.sizes:
        bench(name, SIZES[name], args)


if __name__ == "__main__":
    main(tyro.cli(Args))
