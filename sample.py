"""Load a trained run, continue a prompt, stream the text as it is produced.

    python sample.py --run runs/NAME --prompt "小猫" --max-new-tokens 200 \\
        --temperature 0.8 --top-p 0.9 --seed 0 --num-samples 3

Without --run it samples from the latest run under --runs-dir (default runs/). Decoding
runs `--chunk` tokens per jitted scan and prints between scans. Sample i draws with
`jax.random.fold_in(jax.random.key(seed), i)`, so a seed reproduces its samples exactly.
"""

import codecs
import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import tyro

from llmfn.checkpoint import CONFIG_FILE, load
from llmfn.config import Config
from llmfn.generate import generate_chunks
from llmfn.model import check_tokens


@dataclasses.dataclass(frozen=True)
class Args:
    prompt: str  # the text to continue
    run: Path | None = None  # run directory written by train.py; default: the latest under runs_dir
    runs_dir: Path = Path("runs")  # where train.py writes its runs
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most probable tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens with this much probability; 1 = off
    min_p: float = 0.0  # drop tokens less probable than min_p × the most probable; 0 = off
    seed: int = 0
    num_samples: int = 1
    chunk: int = 16  # decode steps per jitted scan, between prints


def latest_run(runs_dir: Path) -> Path:
    """The most recently modified run directory (one holding config.json) under runs_dir."""
    runs = [d for d in runs_dir.glob("*") if (d / CONFIG_FILE).is_file()] if runs_dir.is_dir() else []
    if not runs:
        raise ValueError(f"no run directory under {runs_dir}/: train one with `python train.py`, or pass --run DIR")
    return max(runs, key=lambda d: d.stat().st_mtime)


def load_run(run: Path):
    """(cfg, params, tokenizer) of a run, or a ValueError saying what is missing or broken."""
    if not run.is_dir():
        raise ValueError(f"run directory {run} does not exist: pass --run with a directory written by train.py")
    try:
        return load(run)
    except Exception as e:  # orbax, json and the file system raise many kinds
        if type(e) is ValueError:  # llmfn's own one-line explanations
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{run} holds a corrupt or unreadable checkpoint ({type(e).__name__}: {reason})") from None


def encode_prompt(text: str, tokenizer, cfg: Config, max_new_tokens: int) -> np.ndarray:
    """The prompt's ids (T,), checked against the model's vocabulary and context."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if ids.size == 0:
        raise ValueError("the prompt is empty: give at least one character to continue")
    check_tokens(ids, cfg)
    if ids.size >= cfg.context:
        raise ValueError(f"the prompt is {ids.size} tokens, but the model's context is {cfg.context}: shorten it")
    if ids.size + max_new_tokens > cfg.context:
        raise ValueError(
            f"{ids.size} prompt + {max_new_tokens} new tokens exceed the model's context ({cfg.context}): "
            f"use --max-new-tokens {cfg.context - ids.size} or less"
        )
    return ids


def stream(params, cfg: Config, tokenizer, prompt: np.ndarray, key, max_new_tokens: int, chunk: int,
           **sampling) -> Iterator[str]:
    """The continuation of `prompt` (T,) as text, one piece per decoded chunk.

    A UTF-8 character split across chunks is held back until it is complete.
    """
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for tokens, valid in generate_chunks(params, prompt[None], key, cfg, max_new_tokens, chunk=chunk, **sampling):
        ids = np.asarray(tokens)[0][np.asarray(valid)[0]]
        yield text.decode(tokenizer.to_bytes(ids))
    yield text.decode(b"", final=True)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax's chatter; failures are reported below
    try:
        run = args.run if args.run is not None else latest_run(args.runs_dir)
        cfg, params, tokenizer = load_run(run)
        prompt = encode_prompt(args.prompt, tokenizer, cfg, args.max_new_tokens)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
        for i in range(args.num_samples):
            key = jax.random.fold_in(jax.random.key(args.seed), i)
            pieces = stream(params, cfg, tokenizer, prompt, key, args.max_new_tokens, args.chunk, **sampling)
            first = next(pieces)  # the settings are checked before anything is printed
            print(f"--- sample {i + 1} of {args.num_samples} ({run}) ---\n{args.prompt}{first}", end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
    except (ValueError, TypeError) as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
