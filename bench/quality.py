"""The quality bar of the default run: `python bench/quality.py [--out-dir DIR] [-- TRAIN FLAGS]`.

Runs `python train.py` (default flags unless given after "--") into a fresh run directory,
then scores the trained model on the built-in corpus:
  1. validation bits per byte over the whole held-out split, against the corpus's exact
     entropy rate (the bar: within 5%);
  2. greedy completion of "the capital of X is" for every country of the fact table
     (the bar: at least 90% correct).
It prints the wall time and the CPU seconds of the training process beside them, so a
figure from a busy machine can be read against the bar of "about 5 minutes on 2 cores".
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmfn  # noqa: E402
from llmfn import checkpoint, corpus, data, samples  # noqa: E402
from llmfn import train as fit  # noqa: E402


def train(out_dir: Path, flags: list[str]) -> tuple[float, float]:
    """Runs train.py into out_dir; returns (wall seconds, CPU seconds of the child)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--out-dir", str(out_dir), *flags], check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def validation_bpb(out_dir: Path, cfg, params, tokenizer) -> float:
    """Bits per byte over the run's whole validation split."""
    recipe = json.loads((out_dir / "train.json").read_text())
    tokens = data.tokenize_cached(corpus.generate(recipe["corpus_bytes"]), tokenizer, out_dir)
    _, val = data.split(tokens, recipe["val_fraction"])
    batches = data.eval_batches(val, 32, cfg.context, max_batches=10**6)
    return fit.evaluate(params, batches, cfg, tokenizer.byte_lengths())["val_bpb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--skip-training", action="store_true", help="score the run already in --out-dir")
    parser.add_argument("flags", nargs="*", help="train.py flags, after --")
    args = parser.parse_args()
    wall = cpu = float("nan")
    if not args.skip_training:
        wall, cpu = train(args.out_dir, args.flags)
    cfg, params, tokenizer = checkpoint.load(args.out_dir)
    bpb, bound = validation_bpb(args.out_dir, cfg, params, tokenizer), corpus.entropy_rate_bpb()
    recall, wrong = samples.fact_recall(params, cfg, tokenizer)
    print(f"model: {llmfn.param_count(cfg):,} params, {cfg.n_layers} layers, width {cfg.d_model}, "
          f"context {cfg.context}, {tokenizer.kind} tokenizer V={cfg.vocab_size}")
    print(f"training: {wall:.0f} s wall, {cpu:.0f} CPU s (≈ {cpu / 2:.0f} s on 2 idle cores)")
    print(f"validation bits/byte {bpb:.4f} vs entropy rate {bound:.4f}: {100 * (bpb / bound - 1):+.2f}% "
          f"({'PASS' if bpb <= 1.05 * bound else 'FAIL'}: bar +5%)")
    print(f"fact recall {100 * recall:.1f}% of {len(corpus.FACTS)} ({'PASS' if recall >= 0.9 else 'FAIL'}: bar 90%)")
    for country, text in wrong.items():
        print(f"  wrong: {country}: {text!r}")


if __name__ == "__main__":
    main()
