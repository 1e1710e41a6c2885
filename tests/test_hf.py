"""from_hf / to_hf against transformers itself, on tiny random models built here (nothing downloaded)."""

import json
import pathlib
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

import llmfn
from llmfn.hf import config_from_hf, config_to_hf, from_hf, to_hf

TOKENS = np.random.default_rng(0).integers(0, 100, (2, 24))  # (B, T)


def gpt2(**overrides):
    cfg = dict(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None)
    return _random(transformers.GPT2LMHeadModel, transformers.GPT2Config(**cfg | overrides))


def llama(**overrides):
    cfg = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, bos_token_id=None, eos_token_id=None)
    return _random(transformers.LlamaForCausalLM, transformers.LlamaConfig(**cfg | overrides))


def _random(cls, config):
    """A float32 eval-mode model whose every weight, norm scale and bias is random (none zero or one)."""
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def llmfn_logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(llmfn.forward(params, jnp.asarray(tokens, jnp.int32), cfg))


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.float32
    return model.eval()


def random_params(cfg, seed=0):
    """θ of cfg's shapes with every entry drawn N(0, 0.2²), built without compiling llmfn.init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), llmfn.param_shapes(cfg))


def assert_close(a, b, tol=1e-4):
    assert np.abs(a - b).max() < tol, np.abs(a - b).max()


HF_MODELS = {
    "gpt2-gelu-tied": lambda: gpt2(),
    "gpt2-relu-untied-inner": lambda: gpt2(activation_function="relu", tie_word_embeddings=False, n_inner=48),
    "llama-gqa": lambda: llama(),
    "llama-bias-tied-theta": lambda: llama(
        num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
    ),
}


@pytest.mark.parametrize("name", HF_MODELS)
def test_from_hf_logits_match_transformers_and_to_hf_round_trips(name, tmp_path):
    model = HF_MODELS[name]()
    cfg, params = from_hf(model)
    expected = hf_logits(model)
    assert_close(llmfn_logits(cfg, params), expected)
    to_hf(cfg, params, tmp_path / "out")
    assert_close(hf_logits(load_hf(tmp_path / "out")), expected)
    cfg_again, params_again = from_hf(tmp_path / "out")
    assert cfg_again == cfg
    jax.tree.map(np.testing.assert_array_equal, params_again, params)


def test_from_hf_reads_the_config_fields():
    cfg, _ = from_hf(HF_MODELS["llama-bias-tied-theta"]())
    got = (cfg.rope_theta, cfg.norm_eps, cfg.bias, cfg.tie_embeddings, cfg.n_kv_heads)
    assert got == (500_000.0, 1e-5, True, True, None)
    cfg, _ = from_hf(HF_MODELS["gpt2-relu-untied-inner"]())
    assert (cfg.mlp, cfg.d_ff, cfg.tie_embeddings, cfg.context, cfg.positions) == ("relu", 48, False, 32, "learned")
    assert from_hf(llama())[0].kv_heads == 2


# config.json of openai-community/gpt2, meta-llama/Llama-2-7b-hf and meta-llama/Meta-Llama-3-8B (fields that matter).
PUBLISHED_CONFIGS = {
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "initializer_range": 0.02,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
             "n_layer": 12, "n_positions": 1024, "vocab_size": 50257},
    "llama2-7b": {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
                  "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
                  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                  "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
                  "torch_dtype": "float16", "vocab_size": 32000},
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu",
                  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
                  "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
                  "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                  "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16", "vocab_size": 128256},
}


@pytest.mark.parametrize("name", PUBLISHED_CONFIGS)
def test_published_configs_read_as_the_presets(name):
    assert config_from_hf(PUBLISHED_CONFIGS[name]) == llmfn.presets[name]


@pytest.mark.parametrize("name", llmfn.presets)
def test_transformers_builds_every_preset_with_the_same_parameter_count(name):
    """The preset written as a transformers config, built on the meta device (nothing allocated)."""
    cfg = llmfn.presets[name]
    config = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == llmfn.param_count(cfg)
    assert config_from_hf(config.to_dict()) == cfg


LLMFN_CONFIGS = {
    "gpt2-like": llmfn.Config(vocab_size=100, context=32, n_layers=2, d_model=64, n_heads=4),
    "llama-like": llmfn.Config(vocab_size=100, context=32, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=80,
                               norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False),
}


@pytest.mark.parametrize("name", LLMFN_CONFIGS)
def test_to_hf_of_llmfn_params_computes_the_same_function(name, tmp_path):
    cfg = LLMFN_CONFIGS[name]
    params = random_params(cfg)
    to_hf(cfg, params, tmp_path)
    assert_close(hf_logits(load_hf(tmp_path)), llmfn_logits(cfg, params))


def test_from_hf_reads_sharded_safetensors(tmp_path):
    model = llama()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    cfg, params = from_hf(tmp_path)
    assert cfg == from_hf(model)[0]
    jax.tree.map(np.testing.assert_array_equal, params, from_hf(model)[1])


def test_from_hf_reads_bfloat16_safetensors_as_float32(tmp_path):
    model = gpt2().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, params = from_hf(tmp_path)
    assert params["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(params["embed"], model.transformer.wte.weight.float().detach().numpy())


def test_from_hf_reads_a_base_model_checkpoint_with_old_buffers(tmp_path):
    """The published gpt2 checkpoint names tensors without 'transformer.' and keeps attn.bias buffers."""
    model = gpt2()
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)) for i in range(2)}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    cfg, params = from_hf(tmp_path)
    assert_close(llmfn_logits(cfg, params), hf_logits(model))


class _Sentinel:
    """Unpickling this creates a file: proof that a checkpoint was (or was not) unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_from_hf_refuses_pickle_checkpoints_without_unpickling(tmp_path):
    sentinel = tmp_path / "unpickled"
    (tmp_path / "config.json").write_text(json.dumps(gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    with pytest.raises(ValueError, match="pickle-based weights \\(pytorch_model.bin\\)"):
        from_hf(tmp_path)
    assert not sentinel.exists()


def _checkpoint_dir(path, config: dict, tensors=None):
    save_file(tensors or {"x": np.zeros(1, np.float32)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "bert"}, "model_type 'bert' is not supported"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope scaling"),
        ({"model_type": "llama", "head_dim": 64, "hidden_size": 64, "num_attention_heads": 4}, "head_dim=64"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias != mlp_bias"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "gpt2", "activation_function": "gelu"}, "activation_function='gelu'"),
        ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "attention scaled"),
    ],
)
def test_from_hf_refuses_configs_llmfn_cannot_compute(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        from_hf(_checkpoint_dir(tmp_path, config))


def test_from_hf_names_missing_misshapen_and_unused_tensors(tmp_path):
    model = gpt2()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    for i, (change, message) in enumerate([
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "lacks tensor transformer.h.1.mlp.c_fc.bias"),
        (lambda s: s.update({"transformer.wpe.weight": np.zeros((16, 64), np.float32)}),
         r"transformer.wpe.weight has shape \(16, 64\), but its config implies \(32, 64\)"),
        (lambda s: s.update({"transformer.h.0.attn.extra": np.zeros(3, np.float32)}),
         "transformer.h.0.attn.extra has no place"),
    ]):
        broken = dict(state)
        change(broken)
        (tmp_path / str(i)).mkdir()
        with pytest.raises(ValueError, match=message):
            from_hf(_checkpoint_dir(tmp_path / str(i), config, broken))


def test_from_hf_refuses_what_is_neither_model_nor_directory(tmp_path):
    with pytest.raises(TypeError, match="model object or a directory path, got int"):
        from_hf(42)
    with pytest.raises(ValueError, match="not a directory with a config.json"):
        from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="holds no weights"):
        from_hf(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(positions="rope"), "no architecture for norm='layernorm', positions='rope'"),
        (dict(norm="rmsnorm", positions="rope", mlp="gelu"), "no architecture"),
        (dict(bias=False), "GPT-2 always has biases"),
        (dict(n_kv_heads=2), "one key/value head per query head"),
    ],
)
def test_to_hf_refuses_configs_transformers_cannot_compute(tmp_path, changes, message):
    cfg = LLMFN_CONFIGS["gpt2-like"].replace(n_layers=1, **changes)
    with pytest.raises(ValueError, match=message):
        to_hf(cfg, random_params(cfg), tmp_path)


def test_to_hf_refuses_to_overwrite_a_checkpoint_or_write_wrong_params(tmp_path):
    cfg = LLMFN_CONFIGS["gpt2-like"].replace(n_layers=1)
    params = random_params(cfg)
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape"):
        to_hf(cfg.replace(vocab_size=99), params, tmp_path / "a")
    to_hf(cfg, params, tmp_path / "b")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        to_hf(cfg, params, tmp_path / "b")
