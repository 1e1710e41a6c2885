"""Looking inside f_θ: the pieces the notebooks call, each one small function.

Axis letters as in model.py, plus E for a stack of parameter sets (an ensemble, or several
checkpoints of one run) and N for a list of token ids.
"""

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .checkpoint import load
from .config import Config
from .model import (
    Params, Transformer, _arange_positions, _check_call, check_params, forward, forward_with_intermediates, query_blocks,
)
from .train import loss_fn

CHECKOUT = Path(__file__).resolve().parents[1]  # where train.py and runs/ live
SMOKE_FLAGS = (  # CI: a tiny model and a few steps, seconds of training
    "--steps", "30", "--warmup", "5", "--corpus-bytes", "200000", "--vocab-size", "512", "--n-layers", "2",
    "--d-model", "64", "--n-heads", "4", "--context", "64", "--batch-size", "16", "--eval-every", "1000",
    "--eval-batches", "2", "--samples", "0",
)
SMALL_FLAGS = (  # no trained default run: a small model that learns the corpus in a few minutes
    "--steps", "400", "--warmup", "40", "--corpus-bytes", "1000000", "--vocab-size", "512", "--n-layers", "4",
    "--d-model", "128", "--n-heads", "4", "--context", "64", "--batch-size", "32", "--samples", "2",
)


def embed(params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Float[Array, "B T D"]:
    """The input embeddings x (B, T, D): token rows of θ["embed"], plus learned positions if any.

    `forward_from_embeddings(params, embed(params, tokens, cfg), cfg)` is `forward(params, tokens, cfg)`.
    """
    _check_call(params, tokens, cfg, cfg.context)
    x = jnp.take(params["embed"], tokens, axis=0)  # (B, T, D)
    if cfg.positions == "learned":
        x = x + params["pos_embed"][: tokens.shape[1]][None]  # (1, T, D)
    return x


@functools.partial(jax.jit, static_argnames="cfg")
def forward_from_embeddings(params: Params, x: Float[Array, "B T D"], cfg: Config) -> Float[Array, "B T V"]:
    """f_θ from its input embeddings: logits (B, T, V) for x (B, T, D) as `embed` makes them.

    Differentiable in x, so `jax.grad` and `jax.jvp` reach each input position.
    """
    if x.ndim != 3 or x.shape[2] != cfg.d_model:
        raise ValueError(f"embeddings must have shape (B, T, {cfg.d_model}), got {x.shape}")
    if x.shape[1] > cfg.context:
        raise ValueError(f"sequence of {x.shape[1]} positions is longer than the context ({cfg.context}): truncate it")
    check_params(params, cfg)
    positions = _arange_positions(x[..., 0])  # (B, T)
    logits, _, _ = Transformer(cfg).apply({"params": params}, None, positions, None, None, embeddings=x)
    return logits


@functools.partial(jax.jit, static_argnames="cfg")
def next_token_distribution(params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Float[Array, "B V"]:
    """p(next token | tokens): the softmax of the last position's logits, (B, V), rows sum to 1."""
    return jax.nn.softmax(forward(params, tokens, cfg)[:, -1], axis=-1)


@functools.partial(jax.jit, static_argnames="cfg")
def attention_maps(params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Float[Array, "L B H T T"]:
    """Every head's attention weights (L, B, H, T, S=T): row t is how query t spreads over keys 0..t."""
    _, intermediates = forward_with_intermediates(params, tokens, cfg)
    return intermediates["attention"]


@functools.partial(jax.jit, static_argnames=("cfg", "position"))
def saliency(params: Params, tokens: Int[Array, "B T"], target, cfg: Config, position: int = -1) -> Float[Array, "B T"]:
    """How much each input token matters to one prediction: (B, T), zero after `position`.

    The L2 norm over D of ∂ log p(target | tokens[:, :position + 1]) / ∂ x, where x = `embed`
    of the tokens; `target` is one token id or one per row (B,). Position -1 is the next
    token after the whole sequence.
    """
    T = tokens.shape[1]
    if not -T <= position < T:
        raise ValueError(f"position {position} is outside a sequence of {T} tokens")
    target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), tokens.shape[:1])  # (B,)

    def logprob(x):  # summed over rows, which are independent: its gradient is per row
        logp = jax.nn.log_softmax(forward_from_embeddings(params, x, cfg)[:, position], axis=-1)  # (B, V)
        return jnp.take_along_axis(logp, target[:, None], axis=1).sum()

    grads = jax.grad(logprob)(embed(params, tokens, cfg))  # (B, T, D)
    return jnp.linalg.norm(grads, axis=-1)


def stack_params(params_list: list[Params]) -> Params:
    """E parameter sets of one config → one θ whose every leaf has a leading E axis."""
    if not params_list:
        raise ValueError("stack_params needs at least one parameter set")
    structure = jax.tree.structure(params_list[0])
    for i, params in enumerate(params_list[1:], 1):
        if jax.tree.structure(params) != structure:
            raise ValueError(f"parameter set {i} has a different structure from set 0: stack sets of one config only")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params_list)


@functools.partial(jax.jit, static_argnames="cfg")
def ensemble_forward(stacked_params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Float[Array, "E B T V"]:
    """f_θ for E parameter sets in one call: logits (E, B, T, V), `jax.vmap` over θ's leading axis."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(stacked_params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"stacked params need one leading axis shared by every leaf, got sizes {sizes}: use stack_params")
    return jax.vmap(forward, in_axes=(0, None, None))(stacked_params, tokens, cfg)


@functools.partial(jax.jit, static_argnames="cfg")
def per_example_grads(params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Params:
    """∇θ of each row's own next-token loss (`train.loss_fn` on that row): θ-shaped, every leaf (B, ...).

    Their mean over B is the gradient of the batch loss; `jax.vmap(jax.grad(...))` in one call.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (B, T) with T >= 2 to have a next token, got {tokens.shape}")
    row_grad = jax.grad(lambda p, row: loss_fn(p, row[None, :-1], row[None, 1:], cfg))
    return jax.vmap(row_grad, in_axes=(None, 0))(params, tokens)


def embedding_projection(params: Params, token_ids: Int[Array, "N"], cfg: Config) -> Float[Array, "N 2"]:
    """The rows embed[token_ids] projected on their first two principal components: (N, 2).

    Rows are centred on their own mean; each axis is signed so its largest coordinate is
    positive, which makes the picture deterministic.
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1 or token_ids.size < 2:
        raise ValueError(f"token_ids must be a list of at least 2 ids, got shape {token_ids.shape}")
    if token_ids.min() < 0 or token_ids.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}, got {token_ids.min()}..{token_ids.max()}")
    rows = jnp.asarray(params["embed"])[token_ids]  # (N, D)
    centred = rows - rows.mean(0)
    _, _, vt = jnp.linalg.svd(centred, full_matrices=False)  # vt (min(N, D), D)
    projected = centred @ vt[:2].T  # (N, 2)
    biggest = jnp.take_along_axis(projected, jnp.abs(projected).argmax(0)[None], axis=0)  # (1, 2)
    return projected * jnp.where(biggest < 0, -1.0, 1.0).astype(projected.dtype)


def forward_flops(cfg: Config, length: int) -> dict[str, int]:
    """Matmul FLOPs of one forward pass over one sequence of `length` tokens.

    {"dense": projections, MLP and head, linear in length; "attention": scores and
    weighted values, 4 D per (query, key) pair computed, quadratic: the pairs are the
    causal blocks of `model.query_blocks` (the full T×T square less the blocks above
    the diagonal, which are skipped)}.
    """
    T, D, F, V, K = length, cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.head_dim
    projections = D * K * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # q, o, k, v
    mlp = D * F * (3 if cfg.mlp == "swiglu" else 2)
    dense = 2 * T * (cfg.n_layers * (projections + mlp) + D * V)
    pairs = sum((end - start) * end for start, end in query_blocks(T))
    return {"dense": dense, "attention": cfg.n_layers * 4 * pairs * D}


def time_forward(params: Params, cfg: Config, lengths, batch: int = 1, repeats: int = 3) -> np.ndarray:
    """Best-of-`repeats` wall seconds of a jitted forward over (batch, length) tokens, per length.

    Compilation is excluded (one warm-up call per length). Returns float64 (len(lengths),).
    """
    fwd = jax.jit(forward, static_argnames="cfg")
    seconds = []
    for length in lengths:
        tokens = jnp.zeros((batch, length), jnp.int32)
        fwd(params, tokens, cfg).block_until_ready()
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fwd(params, tokens, cfg).block_until_ready()
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    return np.array(seconds)


def load_or_train(run_dir, *train_flags: str):
    """(cfg, params, tokenizer) of a run directory's latest checkpoint, training it first if it has none.

    Training is the main job, `python train.py --out-dir run_dir *train_flags`, run in a
    subprocess from the checkout this package lives in; its output streams through.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir()):
        script = CHECKOUT / "train.py"
        if not script.is_file():
            raise ValueError(f"{run_dir} holds no checkpoint and {script} is missing: train the run from a checkout of llmfn")
        subprocess.run([sys.executable, str(script), "--out-dir", str(run_dir), *train_flags], check=True)
    return load(run_dir)


def notebook_run():
    """The run the notebooks look at: (run_dir, cfg, params, tokenizer).

    With LLMFN_SMOKE=1 (CI), a tiny run trained for a few steps in runs/notebooks-smoke;
    otherwise runs/default once `python train.py` has trained it, else a small run trained
    in place in runs/notebooks. Each is trained once and loaded afterwards.
    """
    if os.environ.get("LLMFN_SMOKE") == "1":
        run_dir, flags = CHECKOUT / "runs" / "notebooks-smoke", SMOKE_FLAGS
    elif (CHECKOUT / "runs" / "default" / "checkpoints").is_dir():
        run_dir, flags = CHECKOUT / "runs" / "default", ()
    else:
        run_dir, flags = CHECKOUT / "runs" / "notebooks", SMALL_FLAGS
    return (run_dir, *load_or_train(run_dir, *flags))
