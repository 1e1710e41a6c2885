"""Config: validation, hashability, and the presets' parameter counts without allocating them."""

import dataclasses

import jax
import pytest

import llmfn

# Published parameter counts (tied GPT-2 embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts_match_the_published_figures(name):
    assert llmfn.param_count(llmfn.presets[name]) == PUBLISHED[name]


def test_param_shapes_are_abstract_and_follow_the_layout():
    cfg = llmfn.presets["llama3-8b"]
    shapes = llmfn.param_shapes(cfg)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))  # nothing allocated
    assert shapes["embed"].shape == (128256, 4096) and shapes["head"].shape == (4096, 128256)
    assert shapes["layers"]["attn"]["q"]["kernel"].shape == (32, 4096, 32, 128)  # (L, D, H, K)
    assert shapes["layers"]["attn"]["k"]["kernel"].shape == (32, 4096, 8, 128)  # (L, D, G, K)
    assert shapes["layers"]["mlp"]["gate"]["kernel"].shape == (32, 4096, 14336)  # (L, D, F)
    assert "pos_embed" not in shapes and "bias" not in shapes["layers"]["attn"]["q"]
    gpt2 = llmfn.param_shapes(llmfn.presets["gpt2"])
    assert gpt2["pos_embed"].shape == (1024, 768) and "head" not in gpt2


def test_every_preset_is_a_valid_hashable_config():
    for name, cfg in llmfn.presets.items():
        assert isinstance(cfg, llmfn.Config), name
        assert hash(cfg) == hash(cfg.replace()) and cfg == cfg.replace()
    assert llmfn.presets["small"] == llmfn.Config()


def test_derived_sizes():
    cfg = llmfn.Config(d_model=64, n_heads=8)
    assert (cfg.head_dim, cfg.kv_heads, cfg.ff_dim) == (8, 8, 256)
    cfg = cfg.replace(n_kv_heads=2, d_ff=100)
    assert (cfg.head_dim, cfg.kv_heads, cfg.ff_dim) == (8, 2, 100)


def test_config_is_frozen_and_replace_validates_again():
    cfg = llmfn.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8
    with pytest.raises(ValueError, match="d_model=102 is not divisible by n_heads=4"):
        cfg.replace(d_model=102)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=100, n_heads=8), "d_model=100 is not divisible by n_heads=8"),
        (dict(n_heads=8, d_model=64, n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
        (dict(n_kv_heads=0), "n_kv_heads=0"),
        (dict(n_layers=0), "Config.n_layers must be positive, got 0"),
        (dict(vocab_size=-1), "Config.vocab_size must be positive"),
        (dict(context=0), "Config.context must be positive"),
        (dict(d_ff=0), "Config.d_ff must be positive, got 0"),
        (dict(d_model=12, n_heads=4, positions="rope"), "RoPE needs an even head dim, got 3"),
    ],
)
def test_config_refuses_what_does_not_divide_or_is_not_positive(fields, message):
    with pytest.raises(ValueError, match=message):
        llmfn.Config(**fields)
