"""generate and the samplers against independent references.

References: an uncached full forward recomputed at every step, transformers'
`generate(do_sample=False)` on the same weights (GPT-2 and Llama), and truncated
distributions computed here in numpy by sorting (the textbook way).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llmfn.config import Config
from llmfn.decode import decode_layout, forward_layered
from llmfn.generate import PAD, decode_params, generate, generate_chunks, sample, sampling_probs
from llmfn.hf import from_hf
from llmfn.model import forward, init, init_cache

V, P, N = 96, 6, 9
LENGTHS = np.array([6, 2, 4])
PROMPTS = np.random.default_rng(0).integers(1, V, (3, P)) * (np.arange(P) < LENGTHS[:, None])


def _hf_model(arch):
    torch.manual_seed(0)
    common = dict(vocab_size=V, initializer_range=0.3, eos_token_id=None, bos_token_id=None, pad_token_id=PAD)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_positions=24, n_embd=32, n_layer=2, n_head=4, **common)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=24, tie_word_embeddings=False, **common,
    )
    return transformers.LlamaForCausalLM(config).eval()


@functools.cache
def _setup(arch):
    """(hf model, cfg, params, greedy tokens, valid) for the shared ragged batch."""
    hf = _hf_model(arch)
    cfg, params = from_hf(hf)
    tokens, valid = generate(params, PROMPTS, jax.random.key(0), cfg, N, temperature=0.0, prompt_lengths=LENGTHS)
    return hf, cfg, params, np.asarray(tokens), np.asarray(valid)


@pytest.fixture(params=["gpt2", "llama"])
def setup(request):
    return _setup(request.param)


@pytest.fixture
def gpt2():  # tests of the decode loop itself, which does not depend on the architecture
    return _setup("gpt2")


def _new_tokens(tokens, b):
    return tokens[b, LENGTHS[b] : LENGTHS[b] + N]


def test_layout_and_valid_mask(setup):
    *_, tokens, valid = setup
    assert tokens.shape == valid.shape == (3, P + N) and tokens.dtype == np.int32
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(tokens[b, :n], PROMPTS[b, :n])
        np.testing.assert_array_equal(valid[b], np.arange(P + N) < n + N)
        assert (tokens[b, n + N :] == PAD).all()


def test_cached_decode_matches_full_recompute(setup):
    _, cfg, params, tokens, _ = setup
    full = jax.jit(forward, static_argnames="cfg")
    margins = []
    for b, n in enumerate(LENGTHS):
        seq = list(PROMPTS[b, :n])
        for _ in range(N):
            buffer = np.zeros((1, P + N), np.int32)
            buffer[0, : len(seq)] = seq  # causal: the zeros after seq do not change its logits
            logits = np.asarray(full(params, jnp.asarray(buffer), cfg=cfg))[0, len(seq) - 1]
            top2 = np.sort(logits)[-2:]
            margins.append(top2[1] - top2[0])
            seq.append(int(np.argmax(logits)))
        np.testing.assert_array_equal(_new_tokens(tokens, b), seq[n:])
    assert min(margins) > 1e-4, "greedy choices too close to call: pick another seed"


# Every architecture choice the decode layout (`decode_layout`: fused q/k/v, fused SwiGLU
# gate/up, (out, in) matrices) has to get right, beside the two of the transformers tests.
DECODE_CONFIGS = {
    "gpt2": Config(vocab_size=V, context=16, n_layers=2, d_model=32, n_heads=4),
    "llama-gqa": Config(vocab_size=V, context=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                        mlp="swiglu", positions="rope", bias=False, tie_embeddings=False),
    "swiglu-bias": Config(vocab_size=V, context=16, n_layers=2, d_model=32, n_heads=2, mlp="swiglu", d_ff=48),
    "relu-mqa": Config(vocab_size=V, context=16, n_layers=3, d_model=24, n_heads=3, n_kv_heads=1, mlp="relu",
                       tie_embeddings=False),
}


@pytest.mark.parametrize("name", DECODE_CONFIGS)
def test_decode_layout_logits_match_forward(name):
    """Prefill of 5 tokens, then 3 one-token steps: each row's logits against a full forward."""
    cfg = DECODE_CONFIGS[name].replace(init_std=0.3)  # large weights: differences are not hidden
    params = init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, V)
    want = np.asarray(forward(params, tokens, cfg))  # (2, 8, V)
    layered = decode_layout(params, cfg)
    empty = init_cache(cfg, 2, 8)
    cache = {"k": tuple(empty["k"]), "v": tuple(empty["v"]), "pos": empty["pos"]}
    logits, cache = forward_layered(layered, tokens[:, :5], cache, jnp.array([4, 2]), cfg)
    np.testing.assert_allclose(logits, want[[0, 1], [4, 2]], rtol=1e-5, atol=1e-5)
    for t in range(5, 8):
        logits, cache = forward_layered(layered, tokens[:, t : t + 1], cache, jnp.zeros(2, jnp.int32), cfg)
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-5, atol=1e-5)


def test_greedy_matches_transformers(setup):
    hf, _, _, tokens, _ = setup
    for b, n in enumerate(LENGTHS):
        ids = torch.tensor(PROMPTS[b : b + 1, :n])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N, min_new_tokens=N)
        np.testing.assert_array_equal(_new_tokens(tokens, b), out[0, n:].numpy())


def test_stop_token_ends_a_row_with_padding(gpt2):
    _, cfg, params, greedy, _ = gpt2
    stop = int(_new_tokens(greedy, 1)[2])
    tokens, valid = generate(params, PROMPTS, jax.random.key(0), cfg, N, temperature=0.0,
                             stop_tokens=(stop,), prompt_lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):
        new = list(_new_tokens(greedy, b))
        keep = new.index(stop) + 1 if stop in new else N  # the stop token itself is kept
        want = np.array(new[:keep] + [PAD] * (N - keep))
        np.testing.assert_array_equal(np.asarray(tokens)[b, n : n + N], want)
        np.testing.assert_array_equal(np.asarray(valid)[b], np.arange(P + N) < n + keep)
    assert not np.asarray(valid)[1, LENGTHS[1] + 3 :].any()


def test_per_row_settings_vmap_and_chunks(gpt2):
    _, cfg, params, greedy, _ = gpt2
    key = jax.random.key(7)
    settings = dict(temperature=jnp.array([0.0, 1.0, 0.0]), top_k=jnp.array([0, 5, 0]),
                    top_p=jnp.array([1.0, 0.9, 1.0]), min_p=0.05, prompt_lengths=LENGTHS)
    tokens, _ = generate(params, PROMPTS, key, cfg, N, **settings)
    np.testing.assert_array_equal(np.asarray(tokens)[[0, 2]], greedy[[0, 2]])  # temperature-0 rows

    chunks = list(generate_chunks(params, PROMPTS, key, cfg, N, chunk=4, **settings))
    assert [c[0].shape[1] for c in chunks] == [1, 4, 4]
    new = np.concatenate([np.asarray(c[0]) for c in chunks], 1)
    for b in range(3):
        np.testing.assert_array_equal(new[b], _new_tokens(np.asarray(tokens), b))

    keys = jax.random.split(jax.random.key(1), 3)
    batched = jax.vmap(lambda k: generate(params, PROMPTS, k, cfg, N, **settings)[0])(keys)
    for k, row in zip(keys, np.asarray(batched)):
        np.testing.assert_array_equal(row, np.asarray(generate(params, PROMPTS, k, cfg, N, **settings)[0]))
    assert len({tuple(r[1]) for r in np.asarray(batched)}) > 1, "different keys should sample differently"


def test_decode_params_give_the_same_tokens_and_are_checked(gpt2):
    _, cfg, params, greedy, _ = gpt2
    prepared = decode_params(params, cfg)
    tokens, _ = generate(prepared, PROMPTS, jax.random.key(0), cfg, N, temperature=0.0, prompt_lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(tokens), greedy)
    chunks = generate_chunks(prepared, PROMPTS, jax.random.key(0), cfg, N, chunk=4, temperature=0.0, prompt_lengths=LENGTHS)
    new = np.concatenate([np.asarray(c[0]) for c in chunks], 1)
    for b in range(3):
        np.testing.assert_array_equal(new[b], _new_tokens(greedy, b))
    bad = {**prepared, "layers": (prepared["layers"][0], {**prepared["layers"][1], "qkv": prepared["layers"][1]["qkv"][:-1]})}
    with pytest.raises(ValueError, match=r"params\['layers'\]\[1\]\['qkv'\] has shape"):
        generate(bad, PROMPTS, jax.random.key(0), cfg, N)
    with pytest.raises(ValueError, match="has shape"):
        generate(prepared, PROMPTS, jax.random.key(0), cfg.replace(d_model=64), N)


def test_bad_input_is_refused(gpt2):
    _, cfg, params, _, _ = gpt2
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exceed the context"):
        generate(params, PROMPTS, key, cfg, cfg.context)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(params, PROMPTS, key, cfg, N, prompt_lengths=[0, 1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, PROMPTS + V, key, cfg, N)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, PROMPTS, key, cfg, N, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, PROMPTS, key, cfg, N, temperature=[1.0, -1.0, 1.0])
    with pytest.raises(TypeError, match="top_k"):
        generate(params, PROMPTS, key, cfg, N, top_k=2.5)


# ---------------------------------------------------------------- samplers

# One row per setting: (temperature, top_k, top_p, min_p).
ROWS = [(1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1),
        (0.9, 10, 0.7, 0.05), (2.0, 3, 0.5, 0.0), (0.0, 4, 0.5, 0.2)]


def _reference_probs(logits, temperature, top_k, top_p, min_p):
    """transformers' order, by sorting: temperature, top-k, top-p (renormalised), min-p."""
    if temperature == 0:
        return np.eye(len(logits))[np.argmax(logits)]
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[: top_k or len(p)]] = True
    q = np.where(keep, p, 0) / p[keep].sum()
    cum = np.cumsum(q[order])
    if top_p < 1:
        n = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix with mass >= top_p
        assert np.min(np.abs(cum - top_p)) > 1e-5, "nucleus boundary too close to call"
        keep[order[n:]] = False
    keep &= p >= min_p * p.max()
    return np.where(keep, p, 0) / p[keep].sum()


def _row_settings():
    t, k, p, m = (np.array(c) for c in zip(*ROWS))
    return dict(temperature=t.astype(np.float32), top_k=k, top_p=p.astype(np.float32), min_p=m.astype(np.float32))


def test_sampling_probs_are_the_truncated_renormalised_distribution():
    logits = np.asarray(jax.random.normal(jax.random.key(3), (len(ROWS), 200))) * 2
    got = np.asarray(jax.jit(sampling_probs)(jnp.asarray(logits), **_row_settings()))
    for row, setting in enumerate(ROWS):
        np.testing.assert_allclose(got[row], _reference_probs(logits[row].astype(np.float64), *setting), atol=1e-6)


def test_samples_follow_the_exact_probabilities():
    logits = np.asarray(jax.random.normal(jax.random.key(4), (len(ROWS), 12))) * 1.5
    n = 40_000
    draw = jax.jit(jax.vmap(lambda k: sample(k, jnp.asarray(logits), **_row_settings())))
    draws = np.asarray(draw(jax.random.split(jax.random.key(5), n)))  # (n, rows)
    for row, setting in enumerate(ROWS):
        want = _reference_probs(logits[row].astype(np.float64), *setting)
        counts = np.bincount(draws[:, row], minlength=12)
        assert (counts[want == 0] == 0).all(), f"row {row} drew a token truncation removes"
        z = (counts - n * want) / np.sqrt(n * want * (1 - want) + 1e-12)
        assert np.abs(z[want > 0]).max() < 5, f"row {row}: frequencies {counts / n} vs {want}"
