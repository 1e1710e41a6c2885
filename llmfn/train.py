"""Fitting θ: next-token cross-entropy, the optimizer, and the jitted train and eval steps.

Everything here is pure and jit-able. The train state is one pytree,
`{"params": θ, "opt_state": optax state, "step": () int32, "rng": key}`, so it can be
sharded, donated and checkpointed as a whole. Axis letters as in `llmfn.model`, plus
A for micro-batches (gradient accumulation) and N = B / A rows per micro-batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from .config import Config
from .model import Params, forward

State = dict  # {"params", "opt_state", "step", "rng"}


def cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, "B T"]:
    """Negative log-likelihood in nats of each target under softmax(logits), float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def loss_fn(params: Params, inputs: Int[Array, "B T"], targets: Int[Array, "B T"], cfg: Config) -> Float[Array, ""]:
    """Mean next-token cross-entropy (nats per token) of f_θ(inputs) against targets."""
    return cross_entropy(forward(params, inputs, cfg), targets).mean()


def decay_mask(params: Params) -> Params:
    """True on the leaves AdamW decays: projection kernels and an untied head.

    Norm scales, biases, the token embedding and the position table are not decayed.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path).endswith(("['kernel']", "['head']")), params
    )


def lr_schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Learning rate of update n: linear from 0 over `warmup` updates, then cosine to lr·min_lr_ratio at `steps`."""
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if steps <= 0 or not 0 <= warmup < steps:
        raise ValueError(f"need steps > 0 and 0 <= warmup < steps, got steps={steps}, warmup={warmup}")
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * min_lr_ratio)


def make_optimizer(
    lr: float,
    steps: int,
    warmup: int,
    weight_decay: float = 0.1,
    clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    min_lr_ratio: float = 0.1,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked by `decay_mask`) on `lr_schedule`."""
    schedule = lr_schedule(lr, steps, warmup, min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def init_state(params: Params, optimizer: optax.GradientTransformation, key: jax.Array) -> State:
    """A fresh train state around θ: step 0, optimizer moments at zero, `key` kept for sampling."""
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32), "rng": key}


def train_step(
    state: State, inputs: Int[Array, "B T"], targets: Int[Array, "B T"], cfg: Config,
    optimizer: optax.GradientTransformation, accum: int = 1,
) -> tuple[State, dict]:
    """One optimizer update on a batch of B rows, split into `accum` micro-batches of B / accum.

    The gradient is the mean of the micro-batch gradients (a `lax.scan`, so memory holds
    one micro-batch of activations), which equals the gradient of the whole batch.
    Returns the new state and {"loss": mean nats/token, "grad_norm": global norm before
    clipping}, both () float32. Jit it with `make_train_step`.
    """
    B, T = inputs.shape
    if accum <= 0 or B % accum:
        raise ValueError(f"batch size {B} is not divisible by the accumulation factor {accum}")
    # micro-batch a holds rows a, a + A, ...: on a mesh each device keeps its own rows in every one
    micro = tuple(x.reshape(B // accum, accum, T).swapaxes(0, 1) for x in (inputs, targets))  # (A, N, T) ×2
    grad_fn = jax.value_and_grad(loss_fn)

    def accumulate(carry, batch):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(state["params"], batch[0], batch[1], cfg)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, {"loss": loss_sum / accum, "grad_norm": optax.tree.norm(grads)}


def make_train_step(cfg: Config, optimizer: optax.GradientTransformation, accum: int = 1,
                    in_shardings=None, out_shardings=None):
    """`train_step` jitted for this config and optimizer, the state's buffers donated.

    Call as `state, metrics = step(state, inputs, targets)`; the old state is consumed.
    Shardings, if given, are passed to `jax.jit` unchanged (None: let JAX decide).
    """
    def step(state, inputs, targets):
        return train_step(state, inputs, targets, cfg, optimizer, accum)

    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(step, donate_argnums=0, **kwargs)


def eval_step(params: Params, inputs: Int[Array, "B T"], targets: Int[Array, "B T"], cfg: Config) -> Float[Array, ""]:
    """Summed cross-entropy in nats over the B·T targets (the caller divides by the count)."""
    return cross_entropy(forward(params, inputs, cfg), targets).sum()


def evaluate(params: Params, batches, cfg: Config, token_bytes: np.ndarray, place=jnp.asarray) -> dict:
    """Validation metrics over an iterable of (inputs (B, T), targets (B, T)) NumPy batches.

    `token_bytes` (V,) holds the number of UTF-8 bytes behind each token id (the
    tokenizer's `byte_lengths()`), so bits per byte count the targets' exact bytes.
    `place` puts a batch on the devices (on a mesh: split it, see `llmfn.sharding`).
    Returns {"val_loss": nats/token, "val_ppl": exp(val_loss), "val_bpb": bits per byte}.
    """
    nats, tokens, n_bytes = 0.0, 0, 0
    for inputs, targets in batches:
        nats += float(_eval_jit(params, place(inputs), place(targets), cfg))
        tokens += targets.size
        n_bytes += int(token_bytes[np.asarray(targets)].sum())
    if tokens == 0:
        raise ValueError("no validation batches: the validation split is shorter than one context window")
    loss = nats / tokens
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"val_loss": loss, "val_ppl": ppl, "val_bpb": nats / math.log(2) / n_bytes}


_eval_jit = jax.jit(eval_step, static_argnames="cfg")
