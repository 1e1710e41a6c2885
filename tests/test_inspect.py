"""llmfn.inspect against independent references: a NumPy GPT-2, finite differences,
explicit Python loops, NumPy PCA, XLA's own FLOP count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmfn
from llmfn import checkpoint, inspect, train
from llmfn.tokenizer import ByteTokenizer

GPT = llmfn.Config(vocab_size=64, context=16, n_layers=2, d_model=32, n_heads=4)
LLAMA = llmfn.Config(
    vocab_size=64, context=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, norm="rmsnorm",
    mlp="swiglu", positions="rope", bias=False, tie_embeddings=False,
)
forward = jax.jit(llmfn.forward, static_argnames="cfg")
loss_grad = jax.jit(jax.grad(train.loss_fn), static_argnames="cfg")


@functools.lru_cache
def random_params(cfg, seed=0):
    """θ with every leaf drawn at a scale where attention is far from uniform."""
    params = llmfn.init(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = []
    for (path, leaf), key in zip(leaves, keys):
        noise = jax.random.normal(key, leaf.shape)
        new.append(1 + 0.1 * noise if "scale" in jax.tree_util.keystr(path) else 0.3 * noise)
    return jax.tree_util.tree_unflatten(treedef, new)


def random_tokens(cfg, batch, length, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


def numpy_gpt2(params, tokens):
    """GPT-2 written out in NumPy: → (logits (B, T, V), attention weights (L, B, H, T, T))."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    ln = lambda x, n, l: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * n["scale"][l] + n["bias"][l]  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    B, T = tokens.shape
    x = p["embed"][np.asarray(tokens)] + p["pos_embed"][:T]
    lay, maps = p["layers"], []
    for l in range(lay["attn"]["q"]["kernel"].shape[0]):
        a = lay["attn"]
        h = ln(x, lay["attn_norm"], l)
        q, k, v = (np.einsum("btd,dhk->bthk", h, a[n]["kernel"][l]) + a[n]["bias"][l] for n in "qkv")
        scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        maps.append(w)
        x = x + np.einsum("bshk,bhts,hkd->btd", v, w, a["o"]["kernel"][l]) + a["o"]["bias"][l]
        m = lay["mlp"]
        h = gelu(ln(x, lay["mlp_norm"], l) @ m["up"]["kernel"][l] + m["up"]["bias"][l])
        x = x + h @ m["down"]["kernel"][l] + m["down"]["bias"][l]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p["final_norm"]["scale"] + p["final_norm"]["bias"]
    return x @ p["embed"].T, np.stack(maps)


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt", "llama"])
def test_forward_from_embeddings_is_forward(cfg):
    params, tokens = random_params(cfg), random_tokens(cfg, 2, 6)
    x = inspect.embed(params, tokens, cfg)
    assert x.shape == (2, 6, cfg.d_model)
    np.testing.assert_allclose(
        inspect.forward_from_embeddings(params, x, cfg), forward(params, tokens, cfg), rtol=1e-5, atol=1e-5
    )


def test_attention_maps_and_next_token_match_numpy_gpt2():
    params, tokens = random_params(GPT), random_tokens(GPT, 2, 6)
    want_logits, want_maps = numpy_gpt2(params, tokens)
    maps = inspect.attention_maps(params, tokens, GPT)
    assert maps.shape == (GPT.n_layers, 2, GPT.n_heads, 6, 6)
    assert np.abs(want_maps - want_maps.mean(-1, keepdims=True)).max() > 0.1  # far from uniform: a real check
    np.testing.assert_allclose(maps, want_maps, atol=1e-5)
    want_p = np.exp(want_logits[:, -1] - want_logits[:, -1].max(-1, keepdims=True))
    want_p /= want_p.sum(-1, keepdims=True)
    np.testing.assert_allclose(inspect.next_token_distribution(params, tokens, GPT), want_p, rtol=1e-4, atol=1e-6)


def test_saliency_matches_finite_differences():
    # Adding δ to pos_embed[t] is adding δ to the input embedding at position t (batch of one):
    # a central difference through the plain `forward`, independent of forward_from_embeddings.
    params, tokens, target, position = random_params(GPT), random_tokens(GPT, 1, 6), 5, 3
    got = inspect.saliency(params, tokens, target, GPT, position=position)
    assert got.shape == (1, 6)
    np.testing.assert_array_equal(got[0, position + 1 :], 0.0)  # causal: later tokens cannot matter

    def logprob(pos_embed):
        logits = llmfn.forward({**params, "pos_embed": pos_embed}, tokens, GPT)
        return jax.nn.log_softmax(logits[0, position])[target]

    eps, D = 1e-2, GPT.d_model
    bumps = eps * jnp.eye(6 * D).reshape(6 * D, 6, D)  # one bump per (position, feature)
    padded = lambda b: jnp.pad(b, ((0, GPT.context - 6), (0, 0)))  # noqa: E731
    diff = jax.jit(jax.vmap(lambda b: logprob(params["pos_embed"] + padded(b)) - logprob(params["pos_embed"] - padded(b))))
    grads = (diff(bumps) / (2 * eps)).reshape(6, D)
    np.testing.assert_allclose(got[0], np.linalg.norm(grads, axis=-1), rtol=2e-2, atol=1e-4)


def test_saliency_rows_are_independent():
    params, tokens = random_params(LLAMA), random_tokens(LLAMA, 2, 6)
    both = inspect.saliency(params, tokens, jnp.array([3, 7]), LLAMA)
    np.testing.assert_allclose(both[1], inspect.saliency(params, tokens[1:], 7, LLAMA)[0], rtol=1e-5, atol=1e-7)


def test_ensemble_forward_is_a_loop_over_parameter_sets():
    sets = [random_params(LLAMA, seed) for seed in range(3)]
    tokens = random_tokens(LLAMA, 2, 6)
    got = inspect.ensemble_forward(inspect.stack_params(sets), tokens, LLAMA)
    assert got.shape == (3, 2, 6, LLAMA.vocab_size)
    for e, params in enumerate(sets):
        np.testing.assert_allclose(got[e], forward(params, tokens, LLAMA), rtol=1e-5, atol=1e-5)


def test_per_example_grads_are_a_loop_of_grads():
    params, tokens = random_params(GPT), random_tokens(GPT, 2, 6)
    got = inspect.per_example_grads(params, tokens, GPT)
    for b in range(2):
        want = loss_grad(params, tokens[b : b + 1, :-1], tokens[b : b + 1, 1:], GPT)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g[b], w, rtol=1e-4, atol=1e-6), got, want)


def test_embedding_projection_is_pca():
    params, ids = random_params(GPT), np.array([1, 5, 9, 20, 33, 40, 63])
    got = np.asarray(inspect.embedding_projection(params, ids, GPT))
    rows = np.asarray(params["embed"], np.float64)[ids]
    centred = rows - rows.mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    want = centred @ vectors[:, [-1, -2]]
    np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-4, atol=1e-5)
    for axis in range(2):  # the same axis up to sign, and the sign convention holds
        assert np.allclose(got[:, axis], want[:, axis], atol=1e-4) or np.allclose(got[:, axis], -want[:, axis], atol=1e-4)
        assert got[np.abs(got[:, axis]).argmax(), axis] > 0


def test_forward_flops_match_xla():
    cfg = llmfn.Config(vocab_size=64, context=128, n_layers=1, d_model=64, n_heads=4)
    params = llmfn.init(cfg, jax.random.key(0))
    for length in (32, 128):
        tokens = jnp.zeros((1, length), jnp.int32)
        xla = jax.jit(llmfn.forward, static_argnames="cfg").lower(params, tokens, cfg=cfg).cost_analysis()
        ours = inspect.forward_flops(cfg, length)
        assert 0.85 < (ours["dense"] + ours["attention"]) / xla["flops"] <= 1.0  # XLA also counts elementwise ops


def test_time_forward_times_each_length():
    seconds = inspect.time_forward(random_params(GPT), GPT, [4, 8], repeats=2)
    assert seconds.shape == (2,) and np.all(np.isfinite(seconds)) and np.all(seconds > 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, t: inspect.saliency(p, t, 1, GPT, position=9), "position 9 is outside"),
        (lambda p, t: inspect.forward_from_embeddings(p, jnp.zeros((1, 4, 7)), GPT), r"shape \(B, T, 32\)"),
        (lambda p, t: inspect.stack_params([]), "at least one"),
        (lambda p, t: inspect.stack_params([p, {"embed": p["embed"]}]), "different structure"),
        (lambda p, t: inspect.ensemble_forward(p, t, GPT), "one leading axis"),
        (lambda p, t: inspect.per_example_grads(p, t[:, :1], GPT), "T >= 2"),
        (lambda p, t: inspect.embedding_projection(p, [1, 64], GPT), r"in 0..63"),
    ],
)
def test_bad_input_says_what_to_do(call, match):
    with pytest.raises(ValueError, match=match):
        call(random_params(GPT), random_tokens(GPT, 1, 5))


def test_load_or_train_loads_an_existing_run_without_training(tmp_path):
    params = random_params(GPT)
    checkpoint.save_config(tmp_path, GPT)
    ByteTokenizer().save(tmp_path)
    mngr = checkpoint.manager(tmp_path)
    checkpoint.save(mngr, {"params": params, "opt_state": {"m": jnp.zeros(2)}, "step": jnp.array(7), "rng": jax.random.key(0)})
    mngr.close()
    cfg, got, tokenizer = inspect.load_or_train(tmp_path, "--no-such-flag")  # training would fail on the flag
    assert cfg == GPT and tokenizer.kind == "byte"
    jax.tree.map(np.testing.assert_array_equal, got, params)
