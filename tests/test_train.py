"""The training library against independent references: numpy softmax, one big batch,
AdamW's decoupled decay written out by hand, and exact byte counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llmfn
from llmfn import train

CFG = llmfn.Config(vocab_size=48, context=16, n_layers=2, d_model=32, n_heads=2)


def _batch(key, B=8, T=16, V=48):
    tokens = jax.random.randint(jax.random.key(key), (B, T + 1), 0, V)
    return tokens[:, :-1], tokens[:, 1:]


def test_cross_entropy_is_minus_log_softmax():
    logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = np.array([[0, 4, 2], [1, 1, 3]])
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    want = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(train.cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), want, rtol=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch():
    """Plain SGD with lr 1 turns the step into θ - g, so the gradients themselves are compared;
    the loss is checked against a float64 NumPy log-softmax."""
    opt = optax.sgd(1.0)
    params = llmfn.init(CFG, jax.random.key(0))
    inputs, targets = _batch(1)
    results = {}
    for accum in (1, 4):
        state = train.init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))
        results[accum] = train.make_train_step(CFG, opt, accum)(state, inputs, targets)
    (one, m1), (four, m4) = results[1], results[4]
    logits = np.asarray(llmfn.forward(params, inputs, CFG), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), one["params"], four["params"])
    assert int(four["step"]) == 1


def test_decay_mask_spares_norms_biases_and_embeddings():
    cfg = CFG.replace(tie_embeddings=False)
    mask = train.decay_mask(llmfn.param_shapes(cfg))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['head']"] and flat["['layers']['attn']['q']['kernel']"] and flat["['layers']['mlp']['down']['kernel']"]
    for name in ("['embed']", "['pos_embed']", "['final_norm']['scale']", "['layers']['attn_norm']['bias']",
                 "['layers']['mlp']['up']['bias']"):
        assert not flat[name], name


def test_adamw_decays_only_masked_leaves():
    """With zero gradients Adam's step is zero, so the update is exactly -lr · wd · θ on decayed leaves."""
    cfg = CFG.replace(tie_embeddings=False)
    params = llmfn.init(cfg, jax.random.key(0))
    lr, wd = 0.5, 0.1
    opt = train.make_optimizer(lr, steps=100, warmup=0, weight_decay=wd, min_lr_ratio=1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = opt.update(zeros, opt.init(params), params)
    mask = train.decay_mask(params)
    for decayed, u, p in zip(jax.tree.leaves(mask), jax.tree.leaves(updates), jax.tree.leaves(params)):
        want = -lr * wd * np.asarray(p) if decayed else np.zeros_like(p)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-9)


def test_schedule_warms_up_then_decays_to_the_floor():
    """With zero gradients the update of a decayed leaf is -lr_t · wd · θ: read lr_t off it."""
    opt = train.make_optimizer(1.0, steps=20, warmup=4, weight_decay=0.5, min_lr_ratio=0.1)
    params = {"kernel": jnp.ones(3)}
    opt_state = opt.init(params)
    lrs = []
    for _ in range(21):
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = opt.update({"kernel": jnp.zeros(3)}, opt_state, params)
        lrs.append(-float(updates["kernel"][0]) / 0.5)
    cosine = lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))  # noqa: E731
    want = [t / 4 for t in range(4)] + [cosine(t) for t in range(4, 21)]
    np.testing.assert_allclose(lrs, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(lr=float("nan")), dict(steps=0), dict(warmup=10)])
def test_bad_optimizer_settings_are_refused(kwargs):
    settings = dict(lr=1e-3, steps=10, warmup=1) | kwargs
    with pytest.raises(ValueError):
        train.make_optimizer(**settings)


def test_indivisible_accumulation_is_refused():
    opt = train.make_optimizer(1e-3, 10, 1)
    state = train.init_state(llmfn.init(CFG, jax.random.key(0)), opt, jax.random.key(0))
    inputs, targets = _batch(0, B=6)
    with pytest.raises(ValueError, match="divisible"):
        train.train_step(state, inputs, targets, CFG, opt, accum=4)


def test_evaluate_counts_nats_tokens_and_bytes():
    params = llmfn.init(CFG, jax.random.key(3))
    batches = [_batch(4, B=2), _batch(5, B=2)]
    token_bytes = np.arange(CFG.vocab_size) % 3 + 1  # ids stand for 1, 2 or 3 bytes
    got = train.evaluate(params, batches, CFG, token_bytes)
    nll = np.concatenate([np.asarray(train.cross_entropy(llmfn.forward(params, i, CFG), t)).ravel() for i, t in batches])
    n_bytes = sum(token_bytes[np.asarray(t)].sum() for _, t in batches)
    np.testing.assert_allclose(got["val_loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["val_ppl"], np.exp(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(got["val_bpb"], nll.sum() / np.log(2) / n_bytes, rtol=1e-5)


def test_bf16_compute_trains_with_float32_params():
    cfg = CFG.replace(dtype="bfloat16")
    opt = train.make_optimizer(1e-2, 10, 1)
    state = train.init_state(llmfn.init(cfg, jax.random.key(0)), opt, jax.random.key(0))
    inputs, targets = _batch(6)
    step = train.make_train_step(cfg, opt)
    first = None
    for _ in range(5):
        state, metrics = step(state, inputs, targets)
        first = first if first is not None else float(metrics["loss"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
    assert float(metrics["loss"]) < first  # five steps on one batch: it must fit it
