"""f_θ in its decode layout: what `llmfn.generate` runs at every prefill and decode step.

The same arithmetic as `model.Transformer` (and the same pieces: `Norm`, `rope`,
`attend`, `write_cache`, `mlp_activation`) over θ rearranged for reading one token at a
time (`decode_layout`): per-layer buffers, fused matrices stored (out, in). The cache is
a tuple of per-layer (B, S, G, K) buffers. `forward_layered` is checked against
`model.forward` for every architecture choice in tests/test_generate.py.
"""

import functools

import jax
import jax.numpy as jnp

from .config import Config
from .model import Norm, Params, attend, check_params, compute_dtype, mlp_activation, param_shapes, rope, write_cache


def decode_layout(params: Params, cfg: Config) -> Params:
    """θ rearranged for decoding: params["layers"] becomes a tuple of L per-layer dicts.

    Each layer is its own buffer, and each of its matmuls one (out, in) matrix whose rows
    are contracted against the activation: q, k and v fused into "qkv" ((H + 2G)·K, D),
    SwiGLU's gate and up into "up" (2F, D); "o" (D, H·K), "down" (D, F). At batch 1 a
    decode step is one matrix-vector product per matrix, and on a CPU XLA streams the
    (out, in) layout faster than the stored (in, out) one, and fewer, larger products
    cost less than many small ones. Biases are fused as their matrices are; the norms,
    embeddings and head are kept as they are.
    """
    def layer(p):
        attn, mlp = p["attn"], p["mlp"]
        D = cfg.d_model
        out = {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"]}
        qkv = [attn[n]["kernel"].reshape(D, -1) for n in ("q", "k", "v")]  # (D, N K) each
        out["qkv"] = jnp.concatenate(qkv, 1).T  # ((H + 2G) K, D)
        out["o"] = attn["o"]["kernel"].reshape(-1, D).T  # (D, H K)
        ups = ("gate", "up") if cfg.mlp == "swiglu" else ("up",)
        out["up"] = jnp.concatenate([mlp[n]["kernel"] for n in ups], 1).T  # ((1|2) F, D)
        out["down"] = mlp["down"]["kernel"].T  # (D, F)
        if cfg.bias:
            out["qkv_bias"] = jnp.concatenate([attn[n]["bias"].reshape(-1) for n in ("q", "k", "v")])
            out["up_bias"] = jnp.concatenate([mlp[n]["bias"] for n in ups])
            out["o_bias"], out["down_bias"] = attn["o"]["bias"], mlp["down"]["bias"]
        return out

    return {**params, "layers": tuple(layer(jax.tree.map(lambda x: x[l], params["layers"])) for l in range(cfg.n_layers))}


def decode_params(params: Params, cfg: Config) -> Params:
    """θ rearranged once into the decode layout (`decode_layout`), checked and jitted.

    `generate` and `generate_chunks` accept the result in place of θ and then skip the
    rearrangement, a copy of every layer weight that each call otherwise makes (for a
    GPT-2-124M about 340 MB, most of a call's fixed cost on a CPU). Same tokens either way.
    """
    check_params(params, cfg)
    return _decode_layout_jit(params, cfg)


def is_decode_layout(params: Params) -> bool:
    """Whether θ is already in the decode layout (its layers a tuple of per-layer dicts)."""
    return isinstance(params, dict) and isinstance(params.get("layers"), tuple)


@functools.lru_cache(maxsize=16)
def _decode_shapes(cfg: Config) -> Params:
    return jax.eval_shape(functools.partial(decode_layout, cfg=cfg), param_shapes(cfg))


def check_decode_params(params: Params, cfg: Config) -> None:
    """check_params for θ in either layout (the decode one as `decode_params` makes it)."""
    check_params(params, cfg, _decode_shapes(cfg) if is_decode_layout(params) else None)


def _linear(x, layer, name, cfg: Config):
    """x (B, T, in) against layer[name] (out, in) (+ its bias): (B, T, out) in the compute dtype."""
    dt = compute_dtype(cfg)
    y = jnp.einsum("BTI,OI->BTO", x.astype(dt), layer[name].astype(dt))
    return y + layer[name + "_bias"].astype(dt) if cfg.bias else y


def _block(layer, x, positions, mask, start, cache_kv, cfg: Config):
    """model.Block's arithmetic on one `decode_layout` layer: → (x (B, T, D), (k, v) cache)."""
    B, T, _ = x.shape
    H, G, K = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    h = Norm(cfg).apply({"params": layer["attn_norm"]}, x)
    qkv = _linear(h, layer, "qkv", cfg)  # (B, T, (H + 2G) K)
    q, k, v = jnp.split(qkv.reshape(B, T, H + 2 * G, K), [H, H + G], axis=2)  # (B, T, H|G|G, K)
    if cfg.positions == "rope":
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    k, v = write_cache(cache_kv[0], k, start), write_cache(cache_kv[1], v, start)  # (B, S, G, K)
    out, _ = attend(q, k, v, mask, with_weights=False)  # (B, T, H, K)
    x = x + _linear(out.reshape(B, T, H * K), layer, "o", cfg).astype(x.dtype)
    h = _linear(Norm(cfg).apply({"params": layer["mlp_norm"]}, x), layer, "up", cfg)  # (B, T, (1|2) F)
    gate, up = jnp.split(h, 2, axis=-1) if cfg.mlp == "swiglu" else (None, h)  # the gate's rows come first
    h = mlp_activation(cfg, up, gate)  # (B, T, F)
    return x + _linear(h, layer, "down", cfg).astype(x.dtype), (k, v)


def empty_cache(cfg: Config, batch: int, length: int) -> dict:
    """The cache `forward_layered` fills: {"k", "v": L buffers (B, S, G, K) each, "pos": (B,) zeros}."""
    empty = jnp.zeros((batch, length, cfg.kv_heads, cfg.head_dim), compute_dtype(cfg))  # (B, S, G, K)
    return {"k": (empty,) * cfg.n_layers, "v": (empty,) * cfg.n_layers, "pos": jnp.zeros((batch,), jnp.int32)}


def forward_layered(layered, tokens, cache, last, cfg: Config):
    """forward_cached over `decode_layout` weights, logits only where asked: → (logits (B, V), cache).

    tokens (B, T) at positions cache["pos"] + 0..T-1; `last` (B,) picks the position
    (0..T-1) of each row whose logits are returned. The layers run as a Python loop over
    separate weight and cache buffers: XLA on CPU copies a slice of a stacked (L, ...)
    weight before each matmul (three memory passes per weight per token instead of one),
    and a scanned cache would be rewritten whole at every step.
    """
    T, S = tokens.shape[1], cache["k"][0].shape[1]
    positions = cache["pos"][:, None] + jnp.arange(T, dtype=jnp.int32)  # (B, T)
    mask = (jnp.arange(S) <= positions[..., None])[:, None]  # (B, 1, T, S)
    x = jnp.take(layered["embed"], tokens, axis=0)  # (B, T, D)
    if cfg.positions == "learned":
        x = x + jnp.take(layered["pos_embed"], positions, axis=0)
    ks, vs = [], []
    for layer, k, v in zip(layered["layers"], cache["k"], cache["v"]):
        x, (k, v) = _block(layer, x, positions, mask, cache["pos"], (k, v), cfg)
        ks, vs = ks + [k], vs + [v]  # (B, S, G, K) each
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # (B, 1, D)
    h = Norm(cfg).apply({"params": layered["final_norm"]}, x)
    dt = compute_dtype(cfg)
    # The tied head is contracted as stored, (V, D): a transposed view would be copied whole
    # (V x D floats) at every decode step.
    head, spec = (layered["embed"], "BTD,VD->BTV") if cfg.tie_embeddings else (layered["head"], "BTD,DV->BTV")
    logits = jnp.einsum(spec, h.astype(dt), head.astype(dt), preferred_element_type=jnp.float32)
    return logits[:, 0], {"k": tuple(ks), "v": tuple(vs), "pos": cache["pos"] + T}


_decode_layout_jit = jax.jit(decode_layout, static_argnames="cfg")
