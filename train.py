"""Train a language model: `python train.py [FLAGS]`, the main job of llmfn.

With no flags it fits the small default model to the built-in corpus (a seeded grammar
whose entropy rate is known exactly) in a few minutes on a laptop CPU, shows a progress
bar and one log line per interval, and ends with samples and its final metrics.

  data / tokenizer   --data FILE|DIR (default: the built-in corpus), --tokenizer byte|char|bpe,
                     --vocab-size (BPE only)
  model              --preset NAME, then any field to override it: --n-layers, --d-model,
                     --n-heads, --context, --dtype bfloat16 (bf16 compute), ...
  optimisation       --steps, --batch-size, --accum (micro-batches per step), --lr, --warmup,
                     --weight-decay, --clip, --seed
  run directory      --out-dir (default runs/default): config.json, tokenizer.json,
                     metrics.jsonl, loss.png, checkpoints/ (every --ckpt-every steps, the
                     latest --keep kept, and on Ctrl-C / SIGTERM); --eval-every, --tensorboard
  scale-out          --mesh "data=4,fsdp=2", --coordinator, --num-processes, --process-id

Running the same command again resumes from the latest checkpoint in --out-dir, and ends
bit-identical to a run that was never interrupted. Flags that would change the result
(model, data, optimiser, seed, steps) must match the run directory's.
"""

import contextlib
import dataclasses
import io
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import tyro
from tqdm import tqdm

import llmfn
from llmfn import checkpoint, corpus, data, metrics, samples, sharding
from llmfn import train as fit
from llmfn.files import atomic_write
from llmfn.tokenizer import load_tokenizer, make_tokenizer

Preset = Literal[tuple(llmfn.presets)]


@dataclasses.dataclass(frozen=True)
class Args:
    """Train a language model (see the module docstring for the run directory layout)."""

    data: Path | None = None  # UTF-8 text file or folder of .txt files; None = the built-in corpus
    out_dir: Path = Path("runs/default")  # run directory; rerunning with the same one resumes
    tokenizer: Literal["byte", "char", "bpe"] = "bpe"  # byte: V=256; char: V=#chars; bpe: V=--vocab-size
    vocab_size: int = 1024  # BPE vocabulary size (ignored by byte and char)
    corpus_bytes: int = 2_500_000  # size of the built-in corpus (when --data is not given)
    val_fraction: float = 0.05  # tail of the tokens held out for validation

    preset: Preset = "small"  # model preset; the fields below override it (None = keep)
    context: int | None = None  # T: tokens per training window
    n_layers: int | None = None  # L: transformer layers
    d_model: int | None = None  # D: width of the residual stream
    n_heads: int | None = None  # H: attention heads (D must divide by H)
    n_kv_heads: int | None = None  # G: key/value heads (grouped-query attention)
    d_ff: int | None = None  # F: MLP hidden width
    norm: Literal["layernorm", "rmsnorm"] | None = None  # LayerNorm (GPT-2) or RMSNorm (Llama)
    mlp: Literal["gelu", "swiglu", "relu"] | None = None  # MLP nonlinearity
    positions: Literal["learned", "rope"] | None = None  # learned table (GPT-2) or rotary (Llama)
    dtype: Literal["float32", "bfloat16"] | None = None  # bfloat16: bf16 matmuls, f32 params

    steps: int = 400  # optimizer updates
    batch_size: int = 32  # B: rows per update (global, over all devices)
    accum: int = 1  # micro-batches per update (gradient accumulation), must divide batch_size
    lr: float = 3e-3  # peak learning rate
    warmup: int = 40  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.1  # AdamW decay of projection kernels (not norms, biases, embeddings)
    clip: float = 1.0  # global gradient-norm clip
    seed: int = 0  # seeds θ and the batch order

    log_every: int = 10  # steps between log lines and metrics.jsonl records
    eval_every: int = 100  # steps between validation evaluations
    eval_batches: int = 8  # batches per validation evaluation
    ckpt_every: int = 100  # steps between checkpoints
    keep: int = 2  # checkpoints kept
    samples: int = 4  # samples printed at the end
    tensorboard: bool = False  # also write TensorBoard logs to out_dir/tensorboard

    mesh: str = ""  # device mesh, e.g. "data=4,fsdp=2"; "" = one device, no sharding
    coordinator: str | None = None  # multi-host: address of process 0, host:port
    num_processes: int | None = None
    process_id: int | None = None


MODEL_FIELDS = ("context", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "norm", "mlp", "positions", "dtype")
FREE_FIELDS = ("out_dir", "log_every", "eval_every", "eval_batches", "ckpt_every", "keep", "samples", "tensorboard",
               "mesh", "coordinator", "num_processes", "process_id")  # may differ when resuming


class UserError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit code 2."""


def check_args(args: Args) -> None:
    """Refuses flag values that cannot work, naming the flag."""
    positive = ("vocab_size", "corpus_bytes", "steps", "batch_size", "accum", "log_every", "eval_every",
                "eval_batches", "ckpt_every", "keep")
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        raise UserError(f"--warmup must be in 0..steps-1 ({args.steps - 1}), got {args.warmup}")
    if args.batch_size % args.accum:
        raise UserError(f"--accum {args.accum} does not divide --batch-size {args.batch_size}")
    for name in ("lr", "weight_decay", "clip"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name != "weight_decay" and value == 0):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be strictly between 0 and 1, got {args.val_fraction}")
    if args.samples < 0:
        raise UserError(f"--samples must be >= 0, got {args.samples}")


def recipe(args: Args) -> dict:
    """The flags that determine the result, as JSON-ready values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items() if k not in FREE_FIELDS}


def prepare_run_dir(args: Args, cfg: llmfn.Config, tokenizer) -> None:
    """Writes config.json, train.json and tokenizer.json, or checks the flags against them."""
    run_dir, want = args.out_dir, recipe(args)
    saved_path = run_dir / "train.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        for name, value in want.items():
            if saved.get(name) != value:
                raise UserError(f"--{name.replace('_', '-')} {value} conflicts with {saved.get(name)} in {saved_path}: "
                                "pass the same flags to resume, or choose another --out-dir")
        if checkpoint.read_config(run_dir) != cfg:
            raise UserError(f"the model config differs from {run_dir / 'config.json'}: choose another --out-dir")
        return
    if jax.process_index() == 0:
        checkpoint.save_config(run_dir, cfg)
        tokenizer.save(run_dir)
        with atomic_write(saved_path) as f:
            f.write(json.dumps(want, indent=2) + "\n")


def load_tokens(args: Args):
    """(text-derived train tokens, val tokens, tokenizer, entropy-rate bound or None)."""
    text = data.load_text(args.data) if args.data is not None else corpus.generate(args.corpus_bytes)
    bound = None if args.data is not None else corpus.entropy_rate_bpb()
    if (args.out_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(args.out_dir)
    else:
        tokenizer = make_tokenizer(args.tokenizer, text, args.vocab_size)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokens = data.tokenize_cached(text, tokenizer, args.out_dir)
    train_tokens, val_tokens = data.split(tokens, args.val_fraction)
    return train_tokens, val_tokens, tokenizer, bound


def model_config(args: Args, vocab_size: int) -> llmfn.Config:
    """The preset with the overriding flags and the tokenizer's vocabulary size."""
    overrides = {name: getattr(args, name) for name in MODEL_FIELDS if getattr(args, name) is not None}
    return llmfn.presets[args.preset].replace(vocab_size=vocab_size, **overrides)


class Signals:
    """Remembers SIGINT/SIGTERM so the loop can checkpoint and stop between two steps."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.received = signum

    def restore(self) -> None:
        """Puts back the handlers that were there before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def print_samples(params, cfg, tokenizer, val_tokens, on_corpus: bool, n: int, seed: int) -> None:
    """Prints n samples: on the built-in corpus, greedy fact completions then free sentences."""
    if n == 0:
        return
    if on_corpus:
        countries = list(corpus.FACTS)[: (n + 1) // 2]
        prompts = ["\n" + corpus.fact_prompt(c) for c in countries] + ["\n"] * (n - len(countries))
        temperatures = [0.0] * len(countries) + [1.0] * (n - len(countries))
    else:
        starts = np.linspace(0, len(val_tokens) - 8, n).astype(int)
        prompts = [tokenizer.decode(np.asarray(val_tokens[s : s + 8])) for s in starts]
        temperatures = [0.8] * n
    print("samples:")
    for temperature in sorted(set(temperatures)):
        rows = [p for p, t in zip(prompts, temperatures) if t == temperature]
        for prompt, text in zip(rows, samples.complete(params, cfg, tokenizer, rows, 48, temperature, seed)):
            shown = text.split("\n")[0] if on_corpus and temperature == 0 else text
            print(f"  {prompt.strip() or '⏎'!r} → {shown!r}")


class Run:
    """One training run: the state, its step function, the run directory and what it records."""

    def __init__(self, args: Args):
        check_args(args)
        sharding.initialize(args.coordinator, args.num_processes, args.process_id)
        self.args, self.mesh = args, sharding.make_mesh(args.mesh)
        if self.mesh is not None and args.batch_size % self.mesh.size:
            raise UserError(f"--batch-size {args.batch_size} does not split over the {self.mesh.size} devices of "
                            f"--mesh {args.mesh}: use a multiple of {self.mesh.size}")
        self.train_tokens, self.val_tokens, self.tokenizer, self.bound = load_tokens(args)
        self.cfg = cfg = model_config(args, self.tokenizer.vocab_size)
        for name, split in (("training", self.train_tokens), ("validation", self.val_tokens)):
            llmfn.check_tokens(split, cfg)  # gathers clamp ids >= V silently: refuse them up front
            if len(split) < cfg.context + 1:
                raise UserError(f"the {name} split has {len(split)} tokens, fewer than one window of --context "
                                f"{cfg.context} + 1: use more text or a shorter --context")
        self.main = jax.process_index() == 0
        sharding.barrier("run directory read")  # before process 0 writes into it
        if self.main:
            prepare_run_dir(args, cfg, self.tokenizer)
        sharding.barrier("run directory written")

        optimizer = fit.make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay, args.clip)
        self.schedule = fit.lr_schedule(args.lr, args.steps, args.warmup)

        def fresh_state(seed):
            return fit.init_state(llmfn.init(cfg, jax.random.key(seed)), optimizer, jax.random.key(seed))

        shardings = (None, None)
        if self.mesh is None:
            self.state = fresh_state(args.seed)
        else:  # built already split over the mesh: θ is never whole on one device
            self.state, state_sh = sharding.sharded_init(fresh_state, self.mesh, args.seed)
            shardings = sharding.step_shardings(state_sh, self.mesh)
        self.step_fn = fit.make_train_step(cfg, optimizer, args.accum, *shardings)
        self.mngr = checkpoint.manager(args.out_dir, args.keep)
        restored = checkpoint.restore(self.mngr, self.state)
        if restored is not None:
            self.state = restored
            self.say(f"resuming {args.out_dir} from step {self.step}")
        self.saved_step = self.step if restored is not None else None
        self.log = metrics.MetricsLog(args.out_dir, args.tensorboard) if self.main else None
        self.token_bytes = self.tokenizer.byte_lengths()
        self.last_loss = None  # training loss of the latest log line

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def say(self, line: str) -> None:
        if self.main:
            tqdm.write(line)

    def place(self, batch: np.ndarray) -> jax.Array:
        """A (B, T) batch that every process computed whole, on this run's device(s)."""
        return sharding.place_batch(batch, self.mesh)

    def batch(self, step: int):
        inputs, targets = data.get_batch(self.train_tokens, self.args.seed, step, self.args.batch_size, self.cfg.context)
        return self.place(inputs), self.place(targets)

    def evaluate(self) -> dict:
        batches = data.eval_batches(self.val_tokens, self.args.batch_size, self.cfg.context, self.args.eval_batches)
        result = fit.evaluate(self.state["params"], batches, self.cfg, self.token_bytes, self.place)
        if self.bound is not None:
            result |= {"bound_bpb": self.bound, "gap": result["val_bpb"] / self.bound - 1}
        self.record(self.step, **result)
        return result

    def record(self, step: int, **values: float) -> None:
        """One metrics.jsonl record (process 0 only); each carries the latest training loss."""
        if self.log is not None:
            self.log.write(step, **({} if self.last_loss is None else {"loss": self.last_loss}), **values)

    def save(self) -> None:
        if self.saved_step != self.step:
            checkpoint.save(self.mngr, self.state)
            self.saved_step = self.step

    def log_line(self, step: int, loss: float, grad_norm: float, seconds: float, tokens: int) -> None:
        """The nanoGPT-style line after `step` updates, and its metrics.jsonl record."""
        lr = float(self.schedule(step - 1))
        self.say(f"step {step}: loss {loss:.4f}, {seconds * 1e3:.0f} ms/step, {tokens / seconds:,.0f} tok/s, lr {lr:.2e}")
        self.last_loss = loss
        self.record(step, grad_norm=grad_norm, lr=lr, ms_per_step=seconds * 1e3, tokens_per_s=tokens / seconds)

    def train(self) -> int:
        """Steps until --steps, a signal, or a non-finite loss; returns the exit code."""
        signals = Signals()
        try:
            return self._train(signals)
        finally:
            signals.restore()

    def _train(self, signals: Signals) -> int:
        args = self.args
        tokens_per_step = args.batch_size * self.cfg.context
        bar = tqdm(total=args.steps, initial=self.step, unit="step", disable=not self.main, dynamic_ncols=True)
        clock, clock_step = time.perf_counter(), self.step
        while self.step < args.steps:
            step = self.step
            self.state, out = self.step_fn(self.state, *self.batch(step))
            loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                kept = f"the last good checkpoint (step {self.saved_step}) is kept" if self.saved_step is not None else "no checkpoint was saved"
                print(f"train.py: loss {loss} (gradient norm {grad_norm}) in step {step + 1}: stopped; {kept} in "
                      f"{args.out_dir}; lower --lr or raise --warmup", file=sys.stderr)
                return 1
            bar.update(1)
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                seconds = (time.perf_counter() - clock) / (step + 1 - clock_step)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
                self.log_line(step + 1, loss, grad_norm, seconds, tokens_per_step)
                clock, clock_step = time.perf_counter(), step + 1
            if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                result = self.evaluate()
                self.say(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                clock = time.perf_counter()
            stop = sharding.any_process(signals.received is not None)  # all processes stop at one step
            if (step + 1) % args.ckpt_every == 0 or stop:
                self.save()
            if stop:
                bar.close()
                signum = signals.received or signal.SIGTERM  # a process whose peer got the signal
                print(f"train.py: stopped by signal {signum} at step {self.step}, checkpoint saved in "
                      f"{args.out_dir}: run the same command to resume", file=sys.stderr)
                return 128 + signum
        bar.close()
        return 0

    def finish(self) -> None:
        """Final checkpoint, evaluation, loss curve, samples and metrics."""
        self.save()
        result = self.evaluate()
        wanted = self.args.samples > 0 or self.bound is not None
        params = sharding.gather(self.state["params"]) if wanted else None  # collective
        if not self.main:
            return
        if self.bound is not None:
            result["fact_recall"], _ = samples.fact_recall(params, self.cfg, self.tokenizer)
            self.record(self.step, fact_recall=result["fact_recall"])
        self.log.close()
        metrics.plot_losses(self.args.out_dir, self.bound)
        print_samples(params, self.cfg, self.tokenizer, self.val_tokens, self.bound is not None,
                      self.args.samples, self.args.seed)
        print(f"final (step {self.step}): " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        print(f"run directory: {self.args.out_dir} (metrics.jsonl, loss.png, checkpoints/)")


def parse(argv) -> Args:
    """tyro's parse, with its error box reduced to one line on stderr (exit code 2)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return tyro.cli(Args, args=argv, description=__doc__)
    except SystemExit as exit:
        if exit.code:
            lines = [line.strip(" │╭╮╰╯─") for line in stderr.getvalue().splitlines()]
            lines = [line for line in lines if line]
            print(f"train.py: {lines[1] if len(lines) > 1 else 'bad flags'} (see python train.py --help)", file=sys.stderr)
        raise


def main(argv=None) -> int:
    """Parses the flags, trains, and returns the exit code (2 for a user mistake)."""
    args = parse(argv)
    try:
        run = Run(args)
    except (UserError, ValueError) as error:  # data.DataError and Config's checks are ValueErrors
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    code = run.train()
    if code == 0:
        run.finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
