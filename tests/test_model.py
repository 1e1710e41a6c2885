"""f_θ against a float64 NumPy reference, an uncached recompute and finite differences."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmfn

BASE = llmfn.Config(vocab_size=61, context=16, n_layers=2, d_model=32, n_heads=4)
CONFIGS = {
    "gpt2-gelu-learned-tied": BASE,
    "relu-untied-nobias": BASE.replace(mlp="relu", bias=False, tie_embeddings=False, d_ff=48),
    "llama-swiglu-rope-gqa": BASE.replace(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_heads=2,
                                          bias=False, tie_embeddings=False, norm_eps=1e-6),
    "layernorm-gelu-rope-mqa-bias": BASE.replace(positions="rope", n_kv_heads=1, rope_theta=500.0),
}
LLAMA = CONFIGS["llama-swiglu-rope-gqa"]
TOKENS = np.random.default_rng(0).integers(0, 61, (3, 12))  # (B, T)


def random_params(cfg, seed=0):
    """θ of cfg's shapes, every entry N(0, 0.2²) (norm scales and biases included), no llmfn.init needed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), llmfn.param_shapes(cfg))


jit_forward = jax.jit(llmfn.forward, static_argnames="cfg")
jit_forward_cached = jax.jit(llmfn.forward_cached, static_argnames="cfg")


def forward(params, tokens, cfg):
    """llmfn.forward under jit: compiled once per (cfg, shape) and shared by the tests below."""
    return jit_forward(params, jnp.asarray(tokens, jnp.int32), cfg=cfg)


# ---------------------------------------------------------------- the float64 NumPy reference


def ref_norm(x, p, cfg):
    if cfg.norm == "rmsnorm":
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"]
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + cfg.norm_eps) * p["scale"] + p["bias"]


def ref_rope(x, theta):
    """Rotary embedding as complex multiplication: (x_i + i x_{i+K/2}) e^{i t θ^(-2i/K)}."""
    T, K = x.shape[1], x.shape[-1]
    z = x[..., : K // 2] + 1j * x[..., K // 2 :]
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, K, 2) / K)  # (T, K/2)
    z = z * np.exp(1j * angle)[None, :, None]
    return np.concatenate([z.real, z.imag], -1)


def ref_linear(x, p, equation):
    return np.einsum(equation, x, p["kernel"]) + p.get("bias", 0.0)


def ref_layer(x, lp, cfg, weights=None):
    """One block on the residual stream x (B, T, D); uses the given attention weights if any."""
    h = ref_norm(x, lp["attn_norm"], cfg)
    q, k, v = (ref_linear(h, lp["attn"][n], "btd,dhk->bthk") for n in "qkv")
    if cfg.positions == "rope":
        q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
    R = cfg.n_heads // cfg.kv_heads
    k, v = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)  # query head h reads kv head h // R
    if weights is None:
        scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim)
        T = x.shape[1]
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
    x = x + ref_linear(np.einsum("bhts,bshk->bthk", weights, v), lp["attn"]["o"], "bthk,hkd->btd")
    h = ref_norm(x, lp["mlp_norm"], cfg)
    up = ref_linear(h, lp["mlp"]["up"], "btd,df->btf")
    if cfg.mlp == "swiglu":
        gate = ref_linear(h, lp["mlp"]["gate"], "btd,df->btf")
        up = gate / (1 + np.exp(-gate)) * up
    elif cfg.mlp == "gelu":
        up = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
    else:
        up = np.maximum(up, 0)
    return x + ref_linear(up, lp["mlp"]["down"], "btf,fd->btd"), weights


def ref_head(x, p, cfg):
    head = p["embed"].T if cfg.tie_embeddings else p["head"]
    return ref_norm(x, p["final_norm"], cfg) @ head


def ref_forward(params, tokens, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"][tokens]
    if cfg.positions == "learned":
        x = x + p["pos_embed"][: tokens.shape[1]]
    for layer in range(cfg.n_layers):
        x, _ = ref_layer(x, jax.tree.map(lambda a: a[layer], p["layers"]), cfg)
    return ref_head(x, p, cfg)


# ---------------------------------------------------------------- f_θ itself


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_numpy_reference(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    logits = forward(params, TOKENS, cfg)
    assert logits.shape == (3, 12, cfg.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref_forward(params, TOKENS, cfg), atol=1e-4)


def test_scan_and_unrolled_layers_agree_and_bfloat16_is_close():
    params = random_params(LLAMA)
    scanned = forward(params, TOKENS, LLAMA)
    np.testing.assert_allclose(forward(params, TOKENS, LLAMA.replace(scan_layers=False)), scanned, atol=1e-5)
    bf16 = forward(params, TOKENS, LLAMA.replace(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    assert np.abs(bf16 - scanned).max() < 0.05 * np.abs(scanned).max()


def test_jit_equals_eager():
    params = random_params(LLAMA)
    eager = llmfn.forward(params, jnp.asarray(TOKENS, jnp.int32), LLAMA)
    np.testing.assert_allclose(forward(params, TOKENS, LLAMA), eager, atol=1e-5)


def test_vmap_over_rows_equals_batch_and_over_params_equals_each():
    params, tokens = random_params(LLAMA), jnp.asarray(TOKENS, jnp.int32)
    batch = forward(params, tokens, LLAMA)
    rows = jax.vmap(lambda row: llmfn.forward(params, row[None], LLAMA)[0])(tokens)
    np.testing.assert_allclose(rows, batch, atol=1e-5)
    other = random_params(LLAMA, seed=1)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    ensemble = jax.vmap(lambda p: llmfn.forward(p, tokens, LLAMA))(stacked)
    np.testing.assert_allclose(ensemble[0], batch, atol=1e-5)
    np.testing.assert_allclose(ensemble[1], forward(other, tokens, LLAMA), atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2-gelu-learned-tied", "llama-swiglu-rope-gqa"])
def test_causality(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    before = forward(params, TOKENS, cfg)
    for t in (0, 5, 11):
        changed = TOKENS.copy()
        changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
        after = forward(params, changed, cfg)
        np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-6)
        assert np.abs(after[:, t:] - before[:, t:]).min(axis=-1).max() > 0  # the change is seen from t on


@pytest.mark.parametrize("T", [1, 65, 130, 256])
def test_causal_attention_by_query_blocks_matches_float64_and_its_gradient_the_full_square(T):
    """Several row blocks (T > 64), ragged last blocks, grouped heads: against the textbook
    float64 masked softmax, and its gradient against autodiff of the full T x T computation."""
    B, H, G, K = 2, 4, 2, 8
    keys = jax.random.split(jax.random.key(T), 3)
    q, k, v = (jax.random.normal(key, (B, T, n, K)) for key, n in zip(keys, (H, G, G)))
    got = np.asarray(llmfn.model.causal_by_query_blocks(q, k, v))

    q64, k64, v64 = (np.asarray(x, np.float64).repeat(H // n, axis=2) for x, n in ((q, H), (k, G), (v, G)))
    scores = np.einsum("bthk,bshk->bhts", q64, k64) / np.sqrt(K)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhts,bshk->bthk", weights, v64), atol=1e-5)

    probe = jax.random.normal(jax.random.key(0), got.shape)
    blocks = jax.grad(lambda *x: jnp.vdot(llmfn.model.causal_by_query_blocks(*x), probe), argnums=(0, 1, 2))(q, k, v)
    full = jax.grad(lambda *x: jnp.vdot(jax.nn.dot_product_attention(*x, is_causal=True), probe), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blocks, full):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradient_matches_central_finite_differences():
    cfg = LLAMA
    params, tokens = random_params(cfg), jnp.asarray(TOKENS, jnp.int32)

    @jax.jit
    def loss(p):
        logp = jax.nn.log_softmax(llmfn.forward(p, tokens[:, :-1], cfg))  # (B, T-1, V)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    grad = jax.grad(loss)(params)
    rng = np.random.default_rng(1)
    leaves = ["embed", "layers/attn/q/kernel", "layers/attn_norm/scale", "layers/mlp/gate/kernel", "head", None]
    for leaf in leaves:  # None: a direction in all of θ at once
        direction = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(rng.normal(size=x.shape) * (leaf in (None, _name(path))), jnp.float32), params
        )
        eps = 1e-2
        plus = loss(jax.tree.map(lambda p, u: p + eps * u, params, direction))
        minus = loss(jax.tree.map(lambda p, u: p - eps * u, params, direction))
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
        assert abs(analytic) > 1e-3, leaf
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, err_msg=str(leaf))


def _name(path) -> str:
    return "/".join(k.key for k in path)


# ---------------------------------------------------------------- the KV cache


def cached_logits(params, tokens, cfg, chunks, cache):
    """Feeds tokens chunk by chunk through forward_cached; the logits concatenated over T."""
    out, start = [], 0
    for size in chunks:
        logits, cache = jit_forward_cached(params, jnp.asarray(tokens[:, start : start + size], jnp.int32), cache, cfg=cfg)
        out.append(logits)
        start += size
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("name", ["gpt2-gelu-learned-tied", "llama-swiglu-rope-gqa"])
@pytest.mark.parametrize("chunks", [[1] * 12, [3, 1, 5, 3]], ids=["one-by-one", "chunks"])
def test_cached_forward_equals_full_forward(name, chunks):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    logits, cache = cached_logits(params, TOKENS, cfg, chunks, llmfn.init_cache(cfg, 3))
    np.testing.assert_allclose(logits, forward(params, TOKENS, cfg), atol=1e-5)
    np.testing.assert_array_equal(cache["pos"], [12, 12, 12])
    assert cache["k"].shape == (cfg.n_layers, 3, cfg.context, cfg.kv_heads, cfg.head_dim)


@pytest.mark.parametrize("name", ["gpt2-gelu-learned-tied", "llama-swiglu-rope-gqa"])
def test_cached_forward_with_a_different_position_per_row(name):
    """Rows hold 5, 2 and 0 cached tokens; whatever the cache holds past a row's position must not matter."""
    cfg = CONFIGS[name]
    params = random_params(cfg)
    _, cache = cached_logits(params, TOKENS, cfg, [5], llmfn.init_cache(cfg, 3))
    pos = np.array([5, 2, 0])
    stale = (np.arange(cfg.context) >= pos[:, None])[None, :, :, None, None]  # (1, B, S, 1, 1)
    rng = np.random.default_rng(2)
    noise = lambda x: jnp.asarray(np.where(stale, rng.normal(size=x.shape), x), x.dtype)  # noqa: E731
    cache = {"k": noise(cache["k"]), "v": noise(cache["v"]), "pos": jnp.asarray(pos, jnp.int32)}
    new = np.stack([TOKENS[b, p : p + 3] for b, p in enumerate(pos)])  # (3, 3)
    logits, cache = jit_forward_cached(params, jnp.asarray(new, jnp.int32), cache, cfg=cfg)
    full = forward(params, TOKENS, cfg)
    for b, p in enumerate(pos):
        np.testing.assert_allclose(logits[b], full[b, p : p + 3], atol=1e-5)
    np.testing.assert_array_equal(cache["pos"], pos + 3)


def test_cache_refuses_overflow_and_bad_lengths():
    params = random_params(LLAMA)
    cache = llmfn.init_cache(LLAMA, 3, length=8) | {"pos": jnp.full((3,), 6, jnp.int32)}
    with pytest.raises(ValueError, match="6 used \\+ 3 new do not fit"):
        llmfn.forward_cached(params, jnp.asarray(TOKENS[:, :3], jnp.int32), cache, LLAMA)
    with pytest.raises(ValueError, match="cache length must be in 1..16"):
        llmfn.init_cache(LLAMA, 1, length=17)


# ---------------------------------------------------------------- intermediates


@pytest.mark.parametrize("name", ["gpt2-gelu-learned-tied", "llama-swiglu-rope-gqa"])
def test_forward_with_intermediates(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    logits, inter = llmfn.forward_with_intermediates(params, jnp.asarray(TOKENS, jnp.int32), cfg)
    np.testing.assert_allclose(logits, forward(params, TOKENS, cfg), atol=1e-5)
    residual, attention = np.asarray(inter["residual"], np.float64), np.asarray(inter["attention"], np.float64)
    L, (B, T), H = cfg.n_layers, TOKENS.shape, cfg.n_heads
    assert residual.shape == (L + 1, B, T, cfg.d_model) and attention.shape == (L, B, H, T, T)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    assert not attention[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].any()  # causal: nothing above the diagonal
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    embedding = p["embed"][TOKENS] + (p["pos_embed"][:T] if cfg.positions == "learned" else 0)
    np.testing.assert_allclose(residual[0], embedding, atol=1e-6)
    for layer in range(L):
        lp = jax.tree.map(lambda a: a[layer], p["layers"])
        _, ref_weights = ref_layer(residual[layer], lp, cfg)
        np.testing.assert_allclose(attention[layer], ref_weights, atol=1e-5)
        from_weights, _ = ref_layer(residual[layer], lp, cfg, weights=attention[layer])  # attention output from the weights
        np.testing.assert_allclose(residual[layer + 1], from_weights, atol=1e-4)
    np.testing.assert_allclose(logits, ref_head(residual[L], p, cfg), atol=1e-4)


# ---------------------------------------------------------------- bad input


def test_forward_refuses_bad_tokens():
    params = random_params(LLAMA)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\), got shape \(12,\)"):
        forward(params, TOKENS[0], LLAMA)
    with pytest.raises(ValueError, match="got shape \\(1, 3, 12\\)"):
        forward(params, TOKENS[None], LLAMA)
    with pytest.raises(TypeError, match="tokens must be integer ids, got dtype float32"):
        llmfn.forward(params, jnp.asarray(TOKENS, jnp.float32), LLAMA)
    with pytest.raises(ValueError, match="sequence of 17 tokens is longer than the context \\(16\\)"):
        forward(params, np.zeros((1, 17), np.int32), LLAMA)
    with pytest.raises(TypeError, match="cfg must be an llmfn.Config, got SimpleNamespace"):
        llmfn.forward(params, jnp.asarray(TOKENS, jnp.int32), types.SimpleNamespace(context=16))


def test_check_tokens_refuses_ids_outside_the_vocabulary():
    llmfn.check_tokens(np.array([[0, 60]]), LLAMA)
    with pytest.raises(ValueError, match="token id 61 is outside the vocabulary 0..60"):
        llmfn.check_tokens(np.array([[0, 61]]), LLAMA)
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary 0..60"):
        llmfn.check_tokens(np.array([[-1, 3]]), LLAMA)


def test_params_that_do_not_fit_the_config_are_named():
    params = random_params(LLAMA)
    wrong = jax.tree.map(lambda x: x, params)
    wrong["layers"]["attn"]["k"]["kernel"] = jnp.zeros((2, 32, 4, 8), jnp.float32)
    leaf = r"params\['layers'\]\['attn'\]\['k'\]\['kernel'\]"
    with pytest.raises(ValueError, match=leaf + r" has shape \(2, 32, 4, 8\), but the config needs \(2, 32, 2, 8\)"):
        forward(wrong, TOKENS, LLAMA)
    with pytest.raises(ValueError, match=r"params lack params\['head'\]"):
        forward(random_params(BASE), TOKENS, BASE.replace(tie_embeddings=False))
    with pytest.raises(ValueError, match=r"params hold params\['head'\], which the config does not use"):
        forward(params, TOKENS, LLAMA.replace(tie_embeddings=True))
