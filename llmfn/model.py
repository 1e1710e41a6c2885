"""f_θ(tokens) → logits: Flax Linen modules and the pure functions around them.

Axis letters, used in every shape comment and einsum equation:
  B batch, T query positions, S key/cache positions, D model width, H query heads,
  G key/value heads, R query heads per key/value head (H = G R), K head dim,
  F MLP width, V vocabulary, L layers.

θ is a plain nested dict. Layer params are stacked along a leading L axis whether or not
the layers run under `lax.scan`, so one params layout serves both settings.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .config import Config

Params = dict  # nested dict of arrays: θ
Cache = dict  # {"k": (L, B, S, G, K), "v": (L, B, S, G, K), "pos": (B,) int32}


def compute_dtype(cfg: Config):
    """The dtype of matmul inputs (params and softmax stay float32)."""
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


class Linear(nn.Module):
    """y = einsum(equation, x, W) (+ b), computed in the config's dtype."""

    equation: str
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    std: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(self.std), self.kernel_shape)
        y = jnp.einsum(self.equation, x.astype(self.dtype), w.astype(self.dtype))
        if self.bias_shape is not None:
            y = y + self.param("bias", nn.initializers.zeros, self.bias_shape).astype(self.dtype)
        return y


class Norm(nn.Module):
    """LayerNorm or RMSNorm over D, computed in float32."""

    cfg: Config

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        cfg = self.cfg
        x = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (cfg.d_model,))
        if cfg.norm == "rmsnorm":
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale
        x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
        return x * scale + self.param("bias", nn.initializers.zeros, (cfg.d_model,))


def rope(x: Float[Array, "B T N K"], positions: Int[Array, "B T"], theta: float):
    """Rotary position embedding, rotate-half layout (as transformers' Llama)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (K/2,)
    angle = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, K/2)
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]  # (B, T, 1, K/2)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attend(q, k, v, mask, with_weights: bool):
    """Softmax attention with grouped key/value heads.

    q (B, T, H, K), k and v (B, S, G, K), mask (B, 1, T, S) bool or None (causal, S = T).
    Returns (B, T, H, K) and, if with_weights, the attention weights (B, H, T, S).
    float32 goes through `jax.nn.dot_product_attention` (causal: `causal_by_query_blocks`);
    bfloat16 causal attention on a GPU asks for cuDNN's fused kernel; the rest takes the
    einsum path below, whose dtypes are explicit (jax's own bf16 path promotes f32 with
    bf16 in its backward pass, which strict dtype promotion refuses).
    """
    if not with_weights and q.dtype == jnp.float32:
        if mask is None:
            return causal_by_query_blocks(q, k, v), None
        return jax.nn.dot_product_attention(q, k, v, mask=mask), None
    if not with_weights and mask is None and jax.default_backend() == "gpu":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"), None
        except (RuntimeError, ValueError, NotImplementedError):  # no cuDNN kernel for this GPU or shape
            pass
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), bool))[None, None]  # (1, 1, T, S)
    qg = q.reshape(B, T, G, H // G, K)  # (B, T, G, R, K)
    scores = jnp.einsum("BTGRK,BSGK->BGRTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, H, T, S) / np.sqrt(K).astype(np.float32)
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)  # (B, H, T, S)
    wg = weights.reshape(B, G, H // G, T, S).astype(v.dtype)
    out = jnp.einsum("BGRTS,BSGK->BTGRK", wg, v).reshape(B, T, H, K)
    return out, weights if with_weights else None


def query_blocks(T: int) -> list[tuple[int, int]]:
    """The [start, end) row blocks of `causal_by_query_blocks`: max(64, ⌈T/8⌉) rows each."""
    size = max(64, -(-T // 8))
    return [(start, min(start + size, T)) for start in range(0, T, size)]


def causal_by_query_blocks(q: Float[Array, "B T H K"], k: Float[Array, "B T G K"], v: Float[Array, "B T G K"]):
    """Causal float32 attention, one block of query rows at a time: (B, T, H, K).

    Block [s, e) attends to keys 0..e-1 only, so the score blocks wholly above the diagonal
    are never computed: with n blocks, (n + 1) / 2n of the T x T scores. Exact: each row's
    softmax still sees all of its keys at once. The blocks are `query_blocks(T)`.
    """
    out = []
    for start, end in query_blocks(q.shape[1]):
        mask = jnp.arange(end) <= jnp.arange(start, end)[:, None]  # (e - s, e)
        out.append(jax.nn.dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask=mask[None, None]))
    return jnp.concatenate(out, axis=1)


def write_cache(cache: Float[Array, "B S G K"], new: Float[Array, "B T G K"], start: Int[Array, "B"]):
    """Writes `new` into each row of `cache` at that row's own start position."""
    put = lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
    return jax.vmap(put)(cache, new, start)


class Attention(nn.Module):
    cfg: Config
    with_weights: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, start, cache_kv):
        """x (B, T, D), positions (B, T); cache_kv None or (B, S, G, K) ×2, written from start (B,)."""
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)
        proj = lambda name, N: Linear(  # noqa: E731
            "BTD,DNK->BTNK", (D, N, K), (N, K) if cfg.bias else None, cfg.init_std, dt, name=name
        )
        q, k, v = proj("q", H)(x), proj("k", G)(x), proj("v", G)(x)  # (B, T, H|G, K)
        if cfg.positions == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        new_kv = None
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            k, v = write_cache(cache_k, k, start), write_cache(cache_v, v, start)  # (B, S, G, K)
            new_kv = (k, v)
        out, weights = attend(q, k, v, mask, self.with_weights)  # (B, T, H, K)
        o = Linear("BTHK,HKD->BTD", (H, K, D), (D,) if cfg.bias else None, out_std, dt, name="o")
        return o(out), new_kv, weights


def mlp_activation(cfg: Config, up: Float[Array, "B T F"], gate: Float[Array, "B T F"] | None = None):
    """The MLP's nonlinearity on its up projection: GELU (tanh) or ReLU, or SwiGLU's silu(gate) · up."""
    if cfg.mlp == "swiglu":
        return nn.silu(gate) * up
    return nn.gelu(up, approximate=True) if cfg.mlp == "gelu" else nn.relu(up)


class Mlp(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        D, F = cfg.d_model, cfg.ff_dim
        up = lambda name: Linear("BTD,DF->BTF", (D, F), (F,) if cfg.bias else None, cfg.init_std, dt, name=name)  # noqa: E731
        h = mlp_activation(cfg, up("up")(x), up("gate")(x) if cfg.mlp == "swiglu" else None)  # (B, T, F)
        out_std = cfg.init_std / np.sqrt(2 * cfg.n_layers)
        return Linear("BTF,FD->BTD", (F, D), (D,) if cfg.bias else None, out_std, dt, name="down")(h)


class Block(nn.Module):
    """One pre-norm transformer layer; its signature is lax.scan's (carry, xs) → (carry, ys)."""

    cfg: Config
    with_intermediates: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, start, cache_kv):
        attn = Attention(self.cfg, self.with_intermediates, name="attn")
        a, new_kv, weights = attn(Norm(self.cfg, name="attn_norm")(x), positions, mask, start, cache_kv)
        x = x + a.astype(x.dtype)  # the residual stream stays float32 when compute is bfloat16
        x = x + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x)).astype(x.dtype)
        residual = x if self.with_intermediates else None
        return x, (new_kv, residual, weights)


class Transformer(nn.Module):
    """tokens (B, T) → logits (B, T, V), plus the updated cache and intermediates."""

    cfg: Config
    with_intermediates: bool = False

    @nn.compact
    def __call__(self, tokens, positions, mask, cache, embeddings=None):
        """`embeddings` (B, T, D), when given, replace the lookup of `tokens` (and positions)."""
        cfg, dt = self.cfg, compute_dtype(self.cfg)
        init = nn.initializers.normal(cfg.init_std)
        embed = self.param("embed", init, (cfg.vocab_size, cfg.d_model))  # (V, D)
        x = embeddings
        if x is None:
            x = jnp.take(embed, tokens, axis=0)  # (B, T, D); ids >= V are clamped: see check_tokens
            if cfg.positions == "learned":
                x = x + jnp.take(self.param("pos_embed", init, (cfg.context, cfg.d_model)), positions, axis=0)
        cache_kv, start = (None, None) if cache is None else ((cache["k"], cache["v"]), cache["pos"])
        # Save only the projections' outputs for the backward pass and recompute the rest:
        # norms, GELU, and attention (its B x H x T x S scores are the largest activations
        # and the cheapest to recompute): fewer (L, ...) buffers to fill and read back.
        block = nn.remat(Block, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=1 if cfg.scan_layers else cfg.n_layers,
        )(cfg, self.with_intermediates, name="layers")
        h, (new_kv, residuals, weights) = layers(x, positions, mask, start, cache_kv)  # residuals (L, B, T, D)
        h = Norm(cfg, name="final_norm")(h)
        head = embed.T if cfg.tie_embeddings else self.param("head", init, (cfg.d_model, cfg.vocab_size))
        logits = jnp.einsum("BTD,DV->BTV", h.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)
        new_cache = None
        if cache is not None:
            new_cache = {"k": new_kv[0], "v": new_kv[1], "pos": cache["pos"] + tokens.shape[1]}
        intermediates = None
        if self.with_intermediates:
            intermediates = {"residual": jnp.concatenate([x[None], residuals]), "attention": weights}
        return logits, new_cache, intermediates


# ---------------------------------------------------------------- the pure API


def init(cfg: Config, key: jax.Array) -> Params:
    """θ for `cfg`, drawn from `key`: a plain nested dict of float32 arrays."""
    return _init_jit(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(cfg: Config, key: jax.Array) -> Params:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(cfg).init(key, tokens, tokens, None, None)["params"]


@functools.lru_cache(maxsize=64)
def param_shapes(cfg: Config) -> Params:
    """θ's structure as `jax.ShapeDtypeStruct` leaves, computed without allocating."""
    return jax.eval_shape(functools.partial(_init_jit, cfg), jax.random.key(0))


def param_count(cfg: Config) -> int:
    """Number of scalars in θ (tied embeddings counted once), without allocating."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(param_shapes(cfg)))


def forward(params: Params, tokens: Int[Array, "B T"], cfg: Config) -> Float[Array, "B T V"]:
    """f_θ(tokens): logits (B, T, V) float32 for int tokens (B, T), T <= cfg.context.

    Pure: no state, no side effects. Works eagerly, under `jax.jit(forward,
    static_argnames="cfg")`, `jax.grad` (w.r.t. params) and `jax.vmap`.
    Token ids >= V are clamped by JAX's gather, not refused: use `check_tokens` on
    untrusted input.
    """
    _check_call(params, tokens, cfg)
    logits, _, _ = Transformer(cfg).apply({"params": params}, tokens, _arange_positions(tokens), None, None)
    return logits


def forward_with_intermediates(params: Params, tokens: Int[Array, "B T"], cfg: Config):
    """f_θ(tokens) and what happened inside it.

    Returns (logits (B, T, V), {"residual": (L + 1, B, T, D), "attention": (L, B, H, T, T)}):
    residual[0] is the embedding, residual[l] the residual stream after layer l;
    attention holds the softmax weights of every head (rows sum to 1, causal).
    """
    _check_call(params, tokens, cfg)
    module = Transformer(cfg, with_intermediates=True)
    logits, _, intermediates = module.apply({"params": params}, tokens, _arange_positions(tokens), None, None)
    return logits, intermediates


def init_cache(cfg: Config, batch: int, length: int | None = None) -> Cache:
    """An empty KV cache for `batch` rows of up to `length` (default cfg.context) positions.

    {"k", "v": (L, B, S, G, K) in the compute dtype, "pos": (B,) int32 positions filled}.
    """
    length = cfg.context if length is None else length
    if not 0 < length <= cfg.context:
        raise ValueError(f"cache length must be in 1..{cfg.context} (the config's context), got {length}")
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_dim)
    dt = compute_dtype(cfg)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "pos": jnp.zeros((batch,), jnp.int32)}


def forward_cached(params: Params, tokens: Int[Array, "B T"], cache: Cache, cfg: Config):
    """f_θ on T new tokens per row, attending to the cache: → (logits (B, T, V), cache).

    Row b's tokens take positions cache["pos"][b] + 0..T-1; their keys and values are
    written there and the returned cache has pos + T. The caller keeps pos + T <= S
    (checked here when pos is concrete; under jit an overflowing write is clamped by XLA).
    """
    S = cache["k"].shape[2]
    _check_call(params, tokens, cfg, S)
    if not isinstance(cache["pos"], jax.core.Tracer) and int(jnp.max(cache["pos"])) + tokens.shape[1] > S:
        raise ValueError(f"the cache holds {S} positions: {int(jnp.max(cache['pos']))} used + {tokens.shape[1]} new do not fit")
    positions = cache["pos"][:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # (B, T)
    mask = (jnp.arange(S) <= positions[..., None])[:, None]  # (B, 1, T, S)
    logits, cache, _ = Transformer(cfg).apply({"params": params}, tokens, positions, mask, cache)
    return logits, cache


def check_tokens(tokens, cfg: Config) -> None:
    """Refuses token ids outside 0..V-1 (host-side; the CLIs call this on all input)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        bad = tokens.max() if tokens.max() >= cfg.vocab_size else tokens.min()
        raise ValueError(f"token id {bad} is outside the vocabulary 0..{cfg.vocab_size - 1}: check the tokenizer matches the model")


def _arange_positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # (B, T)


def _check_call(params: Params, tokens, cfg: Config, max_len: int | None = None) -> None:
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be an llmfn.Config, got {type(cfg).__name__}")
    max_len = cfg.context if max_len is None else max_len
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got shape {tokens.shape}: add a batch axis with tokens[None]")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than the context ({max_len}): truncate it")
    check_params(params, cfg)


def check_params(params: Params, cfg: Config, shapes: Params | None = None) -> None:
    """Raises ValueError naming the first leaf of `params` whose shape does not match `cfg`.

    `shapes`: the structure to check against (default `param_shapes(cfg)`).
    """
    got = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for path, want in jax.tree_util.tree_leaves_with_path(param_shapes(cfg) if shapes is None else shapes):
        name = jax.tree_util.keystr(path)
        if name not in got:
            raise ValueError(f"params lack params{name} of shape {want.shape}, which the config needs")
        shape = tuple(jnp.shape(got.pop(name)))
        if shape != want.shape:
            raise ValueError(f"params{name} has shape {shape}, but the config needs {want.shape}")
    if got:
        raise ValueError(f"params hold params{next(iter(got))}, which the config does not use")
