"""transformers ⇄ llmfn: `from_hf` reads GPT-2 and Llama models, `to_hf` writes them back.

Weights travel as safetensors only; a pickle-based checkpoint (*.bin, *.pt, *.pth) is refused,
never unpickled. transformers itself is not needed here: a model object is read through its
`config` and `state_dict()`, a directory through `config.json` and its *.safetensors files.

Layouts. GPT-2 stores Conv1D weights as (in, out) and fuses q, k, v in `c_attn` (D, 3D);
Llama stores nn.Linear weights as (out, in), e.g. q_proj (H K, D), and rotates queries and keys
in the same rotate-half layout as llmfn, so no permutation is needed. llmfn stacks every layer's
leaves on a leading L axis: q kernel (L, D, H, K), o kernel (L, H, K, D), MLP kernels (L, D, F)
and (L, F, D).
"""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import Config
from .model import Params, check_params, param_shapes

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Non-parameter buffers that older transformers versions saved beside the weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------- configs


def _gpt2_config(c: dict) -> Config:
    act = c.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}.get(act)
    if mlp is None:
        raise ValueError(f"GPT-2 activation_function={act!r} is not supported: llmfn has gelu_new (tanh GELU) and relu")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("GPT-2 attention scaled other than by 1/sqrt(head dim) is not supported by llmfn")
    if c.get("add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not supported: llmfn is decoder-only")
    return Config(
        vocab_size=c.get("vocab_size", 50257), context=c.get("n_positions", 1024), n_layers=c.get("n_layer", 12),
        d_model=c.get("n_embd", 768), n_heads=c.get("n_head", 12), d_ff=c.get("n_inner"),
        norm="layernorm", norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp=mlp, positions="learned",
        bias=True, tie_embeddings=c.get("tie_word_embeddings", True), init_std=c.get("initializer_range", 0.02),
    )


def _llama_config(c: dict) -> Config:
    rope = c.get("rope_parameters") or {}
    if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError("Llama rope scaling (rope_scaling / rope_type other than 'default') is not supported by llmfn")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act={c['hidden_act']!r} is not supported: llmfn's gated MLP is SwiGLU (silu)")
    d, heads = c.get("hidden_size", 4096), c.get("num_attention_heads", 32)
    if c.get("head_dim") not in (None, d // heads):
        raise ValueError(f"Llama head_dim={c['head_dim']} is not hidden_size / num_attention_heads: llmfn needs K = D / H")
    if c.get("attention_bias", False) != c.get("mlp_bias", False):
        raise ValueError("Llama with attention_bias != mlp_bias is not supported: llmfn has biases everywhere or nowhere")
    kv = c.get("num_key_value_heads") or heads
    return Config(
        vocab_size=c.get("vocab_size", 32000), context=c.get("max_position_embeddings", 2048),
        n_layers=c.get("num_hidden_layers", 32), d_model=d, n_heads=heads, n_kv_heads=None if kv == heads else kv,
        d_ff=c.get("intermediate_size", 11008), norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
        mlp="swiglu", positions="rope", rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10_000.0))),
        bias=c.get("attention_bias", False), tie_embeddings=c.get("tie_word_embeddings", False),
        init_std=c.get("initializer_range", 0.02),
    )


def _architecture(cfg: Config) -> str:
    """"gpt2" or "llama": the transformers architecture that computes the same function as cfg."""
    if cfg.norm == "layernorm" and cfg.positions == "learned" and cfg.mlp in ("gelu", "relu"):
        if not cfg.bias or cfg.kv_heads != cfg.n_heads:
            raise ValueError(
                "transformers' GPT-2 always has biases and one key/value head per query head: set bias=True, n_kv_heads=None"
            )
        return "gpt2"
    if cfg.norm == "rmsnorm" and cfg.positions == "rope" and cfg.mlp == "swiglu":
        return "llama"
    raise ValueError(
        f"transformers has no architecture for norm={cfg.norm!r}, positions={cfg.positions!r}, mlp={cfg.mlp!r}: "
        "to_hf writes GPT-2 (layernorm, learned, gelu|relu) or Llama (rmsnorm, rope, swiglu)"
    )


def _hf_config(cfg: Config, arch: str) -> dict:
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "bos_token_id": None, "eos_token_id": None, "dtype": "float32"}
    if arch == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
            "n_positions": cfg.context, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.mlp == "gelu" else "relu",
        }
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
        "max_position_embeddings": cfg.context, "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ff_dim, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
    }


# ---------------------------------------------------------------- weights, one layer at a time


def _gpt2_layer(get, p: str, cfg: Config) -> dict:
    """llmfn leaves of GPT-2 layer `p` ("transformer.h.3."), read with get(name, shape)."""
    D, H, K, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.ff_dim
    qkv_w = get(p + "attn.c_attn.weight", (D, 3 * D)).reshape(D, 3, H, K)
    qkv_b = get(p + "attn.c_attn.bias", (3 * D,)).reshape(3, H, K)
    lin = lambda w, b: {"kernel": w, "bias": b}  # noqa: E731
    ln = lambda n: {"scale": get(p + n + ".weight", (D,)), "bias": get(p + n + ".bias", (D,))}  # noqa: E731
    return {
        "attn_norm": ln("ln_1"),
        "attn": {
            **{name: lin(qkv_w[:, i], qkv_b[i]) for i, name in enumerate("qkv")},  # (D, H, K), (H, K)
            "o": lin(get(p + "attn.c_proj.weight", (D, D)).reshape(H, K, D), get(p + "attn.c_proj.bias", (D,))),
        },
        "mlp_norm": ln("ln_2"),
        "mlp": {
            "up": lin(get(p + "mlp.c_fc.weight", (D, F)), get(p + "mlp.c_fc.bias", (F,))),
            "down": lin(get(p + "mlp.c_proj.weight", (F, D)), get(p + "mlp.c_proj.bias", (D,))),
        },
    }


def _gpt2_layer_to_hf(layer: dict, p: str, cfg: Config) -> dict:
    D = cfg.d_model
    a, m = layer["attn"], layer["mlp"]
    return {
        p + "ln_1.weight": layer["attn_norm"]["scale"], p + "ln_1.bias": layer["attn_norm"]["bias"],
        p + "attn.c_attn.weight": np.stack([a[n]["kernel"] for n in "qkv"], 1).reshape(D, 3 * D),
        p + "attn.c_attn.bias": np.stack([a[n]["bias"] for n in "qkv"]).reshape(3 * D),
        p + "attn.c_proj.weight": a["o"]["kernel"].reshape(D, D), p + "attn.c_proj.bias": a["o"]["bias"],
        p + "ln_2.weight": layer["mlp_norm"]["scale"], p + "ln_2.bias": layer["mlp_norm"]["bias"],
        p + "mlp.c_fc.weight": m["up"]["kernel"], p + "mlp.c_fc.bias": m["up"]["bias"],
        p + "mlp.c_proj.weight": m["down"]["kernel"], p + "mlp.c_proj.bias": m["down"]["bias"],
    }


def _llama_layer(get, p: str, cfg: Config) -> dict:
    """llmfn leaves of Llama layer `p` ("model.layers.3."), read with get(name, shape)."""
    D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim

    def lin(name, out_shape, in_dim):  # nn.Linear (out, in) → llmfn (in, *out)
        leaf = {"kernel": get(p + name + ".weight", (int(np.prod(out_shape)), in_dim)).T.reshape(in_dim, *out_shape)}
        if cfg.bias:
            leaf["bias"] = get(p + name + ".bias", (int(np.prod(out_shape)),)).reshape(out_shape)
        return leaf

    o = lin("self_attn.o_proj", (D,), H * K)
    o["kernel"] = o["kernel"].reshape(H, K, D)
    return {
        "attn_norm": {"scale": get(p + "input_layernorm.weight", (D,))},
        "attn": {"q": lin("self_attn.q_proj", (H, K), D), "k": lin("self_attn.k_proj", (G, K), D),
                 "v": lin("self_attn.v_proj", (G, K), D), "o": o},
        "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight", (D,))},
        "mlp": {"gate": lin("mlp.gate_proj", (F,), D), "up": lin("mlp.up_proj", (F,), D),
                "down": lin("mlp.down_proj", (D,), F)},
    }


def _llama_layer_to_hf(layer: dict, p: str, cfg: Config) -> dict:
    out = {p + "input_layernorm.weight": layer["attn_norm"]["scale"],
           p + "post_attention_layernorm.weight": layer["mlp_norm"]["scale"]}
    for group, prefix, names in (("attn", "self_attn.", "qkvo"), ("mlp", "mlp.", ("gate", "up", "down"))):
        for n in names:
            leaf = layer[group][n]
            in_dim = cfg.n_heads * cfg.head_dim if n == "o" else leaf["kernel"].shape[0]  # o kernel is (H, K, D)
            out[f"{p}{prefix}{n}_proj.weight"] = leaf["kernel"].reshape(in_dim, -1).T  # (out, in)
            if cfg.bias:
                out[f"{p}{prefix}{n}_proj.bias"] = leaf["bias"].reshape(-1)
    return out


# ---------------------------------------------------------------- the public API

# arch → (model_type config reader, name prefix of the base model, prefix of layer i, layer readers/writers)
ARCHS = {
    "gpt2": (_gpt2_config, "transformer.", "transformer.h.{}.", _gpt2_layer, _gpt2_layer_to_hf),
    "llama": (_llama_config, "model.", "model.layers.{}.", _llama_layer, _llama_layer_to_hf),
}
# arch → [(llmfn path outside the layers, transformers name)]; the untied head is lm_head.weight transposed.
TOP = {
    "gpt2": [(("embed",), "transformer.wte.weight"), (("pos_embed",), "transformer.wpe.weight"),
             (("final_norm", "scale"), "transformer.ln_f.weight"), (("final_norm", "bias"), "transformer.ln_f.bias")],
    "llama": [(("embed",), "model.embed_tokens.weight"), (("final_norm", "scale"), "model.norm.weight")],
}


def config_from_hf(hf_config: dict) -> Config:
    """The llmfn Config of a transformers GPT-2 / Llama config (a config.json dict or `config.to_dict()`).

    Settings llmfn cannot compute exactly (rope scaling, other activations, ...) raise ValueError.
    """
    arch = hf_config.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"model_type {arch!r} is not supported: llmfn reads 'gpt2' and 'llama'")
    return ARCHS[arch][0](hf_config)


def config_to_hf(cfg: Config) -> dict:
    """The transformers config.json dict (GPT-2 or Llama) whose model computes the same function as cfg."""
    return _hf_config(cfg, _architecture(cfg))


def from_hf(source) -> tuple[Config, Params]:
    """(cfg, θ) from a transformers GPT-2 / Llama causal LM: a model object or a local directory.

    A directory holds `config.json` and `*.safetensors` (sharded with an index json or not);
    pickle-based weights are refused. θ is float32 whatever the checkpoint's dtype, laid out
    as `llmfn.init` lays it out, e.g. embed (V, D) and layers.attn.q.kernel (L, D, H, K).
    Configurations llmfn cannot compute exactly (rope scaling, other activations, ...) raise
    ValueError.
    """
    hf_config, tensors = _read(source)
    cfg, arch = config_from_hf(hf_config), hf_config["model_type"]
    _, base, layer_prefix, read_layer, _ = ARCHS[arch]
    if not any(name.startswith(base) for name in tensors):  # saved from the base model (GPT2Model, LlamaModel)
        tensors = {name if name.startswith("lm_head.") else base + name: t for name, t in tensors.items()}
    used = set()

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"the checkpoint lacks tensor {name}, which its config implies")
        if tensors[name].shape != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tensors[name].shape}, but its config implies {shape}")
        used.add(name)
        return tensors[name]

    want = flatten_dict(param_shapes(cfg))
    flat = {path: get(name, want[path].shape) for path, name in TOP[arch]}
    if not cfg.tie_embeddings:
        flat[("head",)] = get("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T  # (D, V)
    layers = [read_layer(get, layer_prefix.format(i), cfg) for i in range(cfg.n_layers)]
    flat |= flatten_dict({"layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)})  # (L, ...)
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unused = sorted(n for n in set(tensors) - used - ignored if not n.endswith(IGNORED_SUFFIXES))
    if unused:
        raise ValueError(f"checkpoint tensor {unused[0]} has no place in llmfn's {arch} layout: refusing to drop it")
    params = unflatten_dict({path: jnp.asarray(x, jnp.float32) for path, x in flat.items()})
    check_params(params, cfg)
    return cfg, params


def to_hf(cfg: Config, params: Params, out_dir) -> pathlib.Path:
    """Writes θ as a transformers GPT-2 or Llama checkpoint: `config.json` + `model.safetensors`.

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` then computes the same logits
    as `forward(params, tokens, cfg)`. The architecture follows from cfg (layernorm + learned
    positions + gelu|relu → GPT-2; rmsnorm + rope + swiglu → Llama); other configs raise
    ValueError. Weights are written float32. Returns out_dir as a Path.
    """
    check_params(params, cfg)
    arch = _architecture(cfg)
    out = pathlib.Path(out_dir)
    if (out / "config.json").exists() or any(out.glob("*.safetensors")):
        raise ValueError(f"{out} already holds a checkpoint: choose an empty or new directory")
    _, _, layer_prefix, _, write_layer = ARCHS[arch]
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    flat = flatten_dict(host)
    tensors = {name: flat[path] for path, name in TOP[arch]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = flat[("head",)].T  # (V, D)
    for i in range(cfg.n_layers):
        tensors |= write_layer(jax.tree.map(lambda x: x[i], host["layers"]), layer_prefix.format(i), cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_hf_config(cfg, arch), indent=2) + "\n")
    return out


def _read(source) -> tuple[dict, dict[str, np.ndarray]]:
    """(config dict, {name: float32 array}) from a model object or a directory."""
    if isinstance(source, (str, os.PathLike)):
        return _read_dir(pathlib.Path(source))
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        tensors = {name: t.detach().float().cpu().numpy() for name, t in source.state_dict().items()}
        return source.config.to_dict(), tensors
    raise TypeError(
        f"from_hf takes a transformers model object or a directory path, got {type(source).__name__}"
    )


def _read_dir(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a directory with a config.json: save the model with save_pretrained first")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        what = f"only pickle-based weights ({', '.join(pickles)}), which llmfn never unpickles" if pickles else "no weights"
        raise ValueError(f"{path} holds {what}: save them as *.safetensors (save_pretrained does by default)")
    tensors = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file} is listed in {index.name} but missing")
        with safe_open(file, framework="flax") as f:  # the flax reader understands bfloat16; numpy's does not
            tensors |= {name: np.asarray(f.get_tensor(name).astype(jnp.float32)) for name in f.keys()}
    return json.loads((path / "config.json").read_text()), tensors
