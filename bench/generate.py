"""Generation speed: llmfn.generate against transformers' generate, side by side in one run.

    python bench/generate.py            # small preset and a GPT-2-124M-size model
    python bench/generate.py --quick    # fewer tokens and repeats

Both sides get the same random weights (transformers' model read with `from_hf`), the same
prompts and decoding settings (greedy; temperature 0.8 + top-p 0.9) for exactly N new tokens,
and the same CPU cores (PyTorch is timed with 1 thread and with all, and keeps the faster). Timings are
interleaved, so background load hits both alike; compile time is reported apart.

End to end: one generate call of N tokens / N, prefill included, on both sides. For
llmfn also its parts, timed through `generate_chunks` (one chunk of N − 1 decode steps):
the fixed cost of a call (rearranging θ into the decode layout, then the prefill) and one
decode step. The bandwidth bound: a decode step at batch 1 reads every parameter once, so
it cannot take less than (parameter bytes) / (copy bandwidth); the copy bandwidth is
measured in this run (bytes read + written by a large array update). % of bound compares
llmfn's decode step with that time. With --prepared, llmfn is given `decode_params(θ)`,
rearranged once before timing, as a caller generating many times would.
"""

import dataclasses
import functools
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
import torch
import transformers
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.common import copy_bytes_per_s, cores, interleaved  # noqa: E402
from llmfn.config import presets  # noqa: E402
from llmfn.generate import decode_params, generate, generate_chunks  # noqa: E402
from llmfn.hf import from_hf  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Args:
    quick: bool = False  # 16 new tokens, 2 repeats; GPT-2 at batch 1 greedy only
    models: tuple[str, ...] = ("small", "gpt2")  # llmfn preset names (random weights)
    prompt_len: int = 16  # P
    new_tokens: int = 64  # N
    repeats: int = 3
    prepared: bool = False  # pass llmfn.decode_params(θ) (rearranged once) instead of θ


def hf_model(preset: str):
    """A transformers GPT-2 with random weights in the shape of an llmfn preset."""
    cfg = presets[preset]
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ff, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


SAMPLED = dict(temperature=0.8, top_p=0.9)  # the sampled setting, beside greedy


def measure(hf, cfg, params, batch: int, sampled: bool, args: Args) -> dict:
    """Seconds per generate call (llmfn, transformers), llmfn's compile time, fixed cost and decode step."""
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt_len))
    ids = torch.tensor(prompts)
    key = jax.random.key(0)
    settings = SAMPLED if sampled else dict(temperature=0.0)
    N = args.new_tokens
    params = decode_params(params, cfg) if args.prepared else params

    def ours():
        generate(params, prompts, key, cfg, N, **settings)[0].block_until_ready()

    def theirs(threads: int):
        torch.set_num_threads(threads)
        with torch.no_grad():
            hf_settings = dict(do_sample=True, top_k=0, **SAMPLED) if sampled else dict(do_sample=False)
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N, **hf_settings)

    parts = {"fixed": [], "step": []}

    def ours_in_parts():  # the prefill's chunk, then one chunk of all N - 1 decode steps
        start = time.perf_counter()
        chunks = generate_chunks(params, prompts, key, cfg, N, chunk=N - 1, **settings)
        next(chunks)[0].block_until_ready()
        prefilled = time.perf_counter()
        next(chunks)[0].block_until_ready()
        parts["fixed"].append(prefilled - start)
        parts["step"].append((time.perf_counter() - prefilled) / (N - 1))

    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    # transformers gets its better thread count: on a busy machine PyTorch's spinning
    # thread pool can run many times slower with every core than with one.
    fns = {"llmfn": ours, "parts": ours_in_parts}
    fns |= {threads: functools.partial(theirs, threads) for threads in sorted({1, cores()})}
    t = interleaved(fns, repeats=args.repeats)
    threads = min(sorted({1, cores()}), key=t.get)
    # A setting that reuses a compiled program (same shapes) shows ~0: settings are traced.
    return {"llmfn": t["llmfn"], "transformers": t[threads], "threads": threads,
            "compile": max(first - t["llmfn"], 0.0),
            **{k: statistics.median(v[1:]) for k, v in parts.items()}}  # v[0]: the warm-up call


def main(args: Args) -> None:
    if args.quick:
        args = dataclasses.replace(args, new_tokens=16, repeats=2)
    unknown = [m for m in args.models if m not in presets]
    if unknown or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        problem = (f"unknown model {unknown[0]!r} (choose from {', '.join(presets)})" if unknown
                   else "need prompt-len >= 1, new-tokens >= 2 (one prefill token, then decode steps) and repeats >= 1")
        print(f"bench/generate.py: {problem}", file=sys.stderr)
        raise SystemExit(2)
    transformers.logging.set_verbosity_error()  # its padding advice does not apply: no prompt is padded
    bandwidth = copy_bytes_per_s()
    print(f"{cores()} cores | jax {jax.__version__} ({jax.default_backend()}) | torch {torch.__version__} "
          f"| copy bandwidth {bandwidth / 1e9:.1f} GB/s | P={args.prompt_len} N={args.new_tokens}"
          f"{' | llmfn given decode_params(θ)' if args.prepared else ''}")
    print("model  batch mode   | llmfn tok/s ms/token compile s | fixed ms ms/step | transformers tok/s ms/token threads "
          "| speed-up | % of bound")
    for preset in args.models:
        hf = hf_model(preset)
        cfg, params = from_hf(hf)
        if cfg.replace(scan_layers=True) != presets[preset].replace(scan_layers=True):
            raise SystemExit(f"bench/generate.py: preset {preset!r} is not a GPT-2 layout transformers can mirror")
        # Bytes one decode step reads: every float32 parameter (the tied head once), but only
        # one row of the position table.
        param_bytes = 4 * (sum(x.size for x in jax.tree.leaves(params)) - params["pos_embed"].size + cfg.d_model)
        for batch, sampled in ((1, False), (16, False), (1, True)):
            if args.quick and (batch, sampled) != (1, False) and preset != "small":
                continue
            t = measure(hf, cfg, params, batch, sampled, args)
            ms = {k: 1e3 * t[k] / args.new_tokens for k in ("llmfn", "transformers")}  # end to end, per new token
            rate = {k: batch * args.new_tokens / t[k] for k in ("llmfn", "transformers")}
            bound = f"{100 * param_bytes / bandwidth / t['step']:5.0f}%" if batch == 1 else "     -"
            print(f"{preset:6s} {batch:5d} {'top-p' if sampled else 'greedy':6s} | {rate['llmfn']:11.1f} {ms['llmfn']:8.2f} "
                  f"{t['compile']:9.1f} | {1e3 * t['fixed']:8.1f} {1e3 * t['step']:7.2f} | {rate['transformers']:18.1f} "
                  f"{ms['transformers']:8.2f} {t['threads']:7d} | {t['transformers'] / t['llmfn']:7.2f}x | {bound}")
    print("ms/token = one generate call of N tokens / N (prefill included); fixed ms + (N - 1) ms/step = llmfn's call")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__.split("\n\n")[0]))
