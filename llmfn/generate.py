"""Generation: f_θ called again and again, as one jitted computation.

prefill  one forward over the prompts writes their keys and values into an explicit KV
         cache and gives the logits of each row's first new token;
decode   `lax.scan` over the remaining new positions, each step one forward of one token
         per row against that cache. Both run f_θ in its decode layout
         (`llmfn.decode`: per-layer buffers, fused matrices), made per call from θ,
         or once by `decode_params` for many calls.

The sampling settings are per-row arrays (B,), traced, so one compiled program serves
every temperature, top-k, top-p and min-p, and `jax.vmap` over keys or settings works.
New token j of every row is drawn with `jax.random.fold_in(key, j)`, so `generate` and
the chunked `generate_chunks` draw the same tokens.

Output layout. Prompts come RIGHT-padded, (B, P), with `prompt_lengths` (B,) giving each
row's length n_b. The output is (B, P + N): row b holds its prompt in columns 0..n_b-1 and
its new tokens directly after, in columns n_b..n_b+N-1; every other column is PAD (0).
`valid` (B, P + N) marks prompt and generated tokens. A row that emits a stop token keeps
it (valid) and emits only PAD (not valid) after it.

Truncation (top-k, then top-p on what top-k leaves, then min-p, in transformers' order)
sorts nothing: each threshold is found by bisection over the float32 bit patterns of the
probabilities, which order like the probabilities themselves, so 30 masked reductions over
V give the exact k-th largest probability and the exact nucleus boundary. Tokens tied with
a boundary are all kept. Rows that ask for no truncation skip it (`lax.cond`). A token is
then drawn by inverse CDF: one uniform per row against the running sum of what is kept.
"""

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .config import Config
from .decode import check_decode_params, decode_layout, decode_params, empty_cache, forward_layered, is_decode_layout
from .model import Params, check_tokens

PAD = 0  # the token id written where a row has nothing (see `valid`)
_BISECTION_STEPS = 30  # float32 bit patterns of probabilities in [0, 1] span < 2**30 values


# ---------------------------------------------------------------- samplers


def sampling_probs(
    logits: Float[Array, "B V"], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
) -> Float[Array, "B V"]:
    """The exact distribution `sample` draws from: (B, V) float32, rows sum to 1.

    softmax(logits / temperature), truncated by top-k (0 = off), top-p (1 = off) and
    min-p (0 = off), renormalised; temperature 0 gives the one-hot argmax. Settings are
    Python numbers or (B,) arrays.
    """
    s = _settings(logits.shape[0], temperature, top_k, top_p, min_p)
    kept = _truncate(logits, **s)  # (B, V)
    greedy = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(s["temperature"][:, None] > 0, kept / jnp.sum(kept, -1, keepdims=True), greedy)


def sample(
    key: jax.Array, logits: Float[Array, "B V"], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
) -> Int[Array, " B"]:
    """One token per row (B,) int32 drawn from `sampling_probs(logits, ...)` with `key`."""
    s = _settings(logits.shape[0], temperature, top_k, top_p, min_p)
    return _sample(key, logits, s)


def _sample(key, logits, s):
    """Inverse CDF: one uniform per row against the running sum of the kept probabilities
    (the Gumbel trick's V random numbers per row cost several times more on a CPU)."""
    cdf = jnp.cumsum(_truncate(logits, **s), -1)  # (B, V)
    total = cdf[:, -1:]
    u = jnp.minimum(jax.random.uniform(key, total.shape) * total, jnp.nextafter(total, 0.0))  # < total
    drawn = jnp.argmax(cdf > u, -1)  # the first token whose interval holds u; never a removed one
    return jnp.where(s["temperature"] > 0, drawn, jnp.argmax(logits, -1)).astype(jnp.int32)


def _truncate(logits, temperature, top_k, top_p, min_p):
    """softmax(logits / temperature) with the tokens truncation removes set to 0: (B, V)."""
    V = logits.shape[-1]
    sampled = temperature > 0  # (B,); greedy rows need no truncation
    scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]  # (B, V)
    probs = jax.nn.softmax(scaled, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # (B, V), ordered like probs >= 0
    keep = jnp.ones(probs.shape, bool)

    use_k = sampled & (top_k > 0) & (top_k < V)  # (B,)
    def top_k_mask():
        k = jnp.where(use_k, top_k, 1).astype(jnp.float32)
        return bits >= _threshold(bits, jnp.ones_like(probs), k)[:, None]
    keep &= jax.lax.cond(jnp.any(use_k), top_k_mask, lambda: keep) | ~use_k[:, None]

    use_p = sampled & (top_p < 1)
    def top_p_mask():
        mass = jnp.where(keep, probs, 0.0)  # (B, V): the top-k distribution, unnormalised
        target = jnp.where(use_p, top_p, 1.0) * jnp.sum(mass, -1)
        return bits >= _threshold(bits, mass, target)[:, None]
    keep &= jax.lax.cond(jnp.any(use_p), top_p_mask, lambda: keep) | ~use_p[:, None]

    keep &= probs >= (min_p * jnp.max(probs, -1))[:, None]
    return jnp.where(keep, probs, 0.0)


def _threshold(bits: Int[Array, "B V"], weight: Float[Array, "B V"], target: Float[Array, " B"]):
    """Per row, the largest t with sum(weight[bits >= t]) >= target, by bisection (B,)."""
    lo = jnp.zeros(bits.shape[:1], jnp.int32)  # assumed to satisfy: the whole row
    hi = jnp.max(bits, -1) + 1  # never satisfies: nothing is >= max + 1

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid[:, None], weight, 0.0), -1) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
    return lo


def _settings(B: int, temperature, top_k, top_p, min_p) -> dict:
    """The sampling settings as (B,) arrays, checked where their values are concrete."""
    def row(value, dtype, name):
        value = jnp.asarray(value)
        if jnp.issubdtype(dtype, jnp.integer) and not jnp.issubdtype(value.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer or an integer array, got dtype {value.dtype}")
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != B):
            raise ValueError(f"{name} must be a number or an array of shape ({B},), got shape {value.shape}")
        return jnp.broadcast_to(value.astype(dtype), (B,))

    s = {
        "temperature": row(temperature, jnp.float32, "temperature"),
        "top_k": row(top_k, jnp.int32, "top_k"),
        "top_p": row(top_p, jnp.float32, "top_p"),
        "min_p": row(min_p, jnp.float32, "min_p"),
    }
    limits = {"temperature": (0, np.inf, "0 or more (0 = greedy)"), "top_k": (0, np.inf, "0 or more (0 = off)"),
              "top_p": (0, 1, "in (0, 1] (1 = off)"), "min_p": (0, 1, "in [0, 1] (0 = off)")}
    for name, value in s.items():
        if isinstance(value, jax.core.Tracer):
            continue
        lo, hi, what = limits[name]
        v = np.asarray(value)
        bad = ~((v >= lo) & (v <= hi)) | ((v <= 0) if name == "top_p" else False)
        if bad.any():
            raise ValueError(f"{name} must be {what}, got {v[bad][0]}")
    return s


# ---------------------------------------------------------------- prefill and decode


def _pick(key, step, logits, settings, stops, done):
    """Samples token `step` of every row; PAD where a row had stopped. → (token, valid, done)."""
    token = _sample(jax.random.fold_in(key, step), logits, settings)
    valid = ~done
    token = jnp.where(valid, token, PAD)
    return token, valid, done | jnp.isin(token, stops)


def _prefill(layered, prompts, lengths, key, settings, stops, cfg: Config, cache_len: int):
    """Prompts (B, P) → (decode state, first new token (B,)), cache of `cache_len` positions."""
    B = prompts.shape[0]
    logits, cache = forward_layered(layered, prompts, empty_cache(cfg, B, cache_len), lengths - 1, cfg)  # (B, V) at each row's last
    cache = {**cache, "pos": lengths}  # padding keys past n_b are masked, then overwritten
    token, _, done = _pick(key, 0, logits, settings, stops, jnp.zeros((B,), bool))
    return {"cache": cache, "last": token, "done": done, "step": jnp.ones((), jnp.int32)}, token


def _decode(layered, state, key, settings, stops, cfg: Config, steps: int):
    """`steps` decode steps: → (state, tokens (B, steps), valid (B, steps))."""
    def step(state, _):
        last = jnp.zeros_like(state["last"])
        logits, cache = forward_layered(layered, state["last"][:, None], state["cache"], last, cfg)  # (B, V)
        token, valid, done = _pick(key, state["step"], logits, settings, stops, state["done"])
        return {"cache": cache, "last": token, "done": done, "step": state["step"] + 1}, (token, valid)

    state, (tokens, valid) = jax.lax.scan(step, state, length=steps)  # (steps, B)
    return state, tokens.T, valid.T


def _place(prompts, lengths, new, new_valid):
    """Each row's new tokens (B, N) directly after its own prompt: → tokens, valid (B, P + N)."""
    B, P = prompts.shape
    N = new.shape[1]
    in_prompt = jnp.arange(P + N) < lengths[:, None]  # (B, P + N)
    put = jax.vmap(lambda row, x, start: jax.lax.dynamic_update_slice(row, x, (start,)))
    placed = put(jnp.zeros((B, P + N), jnp.int32), new, lengths)
    placed_valid = put(jnp.zeros((B, P + N), bool), new_valid, lengths)
    tokens = jnp.where(in_prompt, jnp.pad(prompts, ((0, 0), (0, N))), placed)
    return tokens, in_prompt | placed_valid


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, prompts, lengths, key, settings, stops, cfg: Config, max_new_tokens: int):
    P = prompts.shape[1]
    layered = params if is_decode_layout(params) else decode_layout(params, cfg)
    state, first = _prefill(layered, prompts, lengths, key, settings, stops, cfg, P + max_new_tokens)
    _, rest, rest_valid = _decode(layered, state, key, settings, stops, cfg, max_new_tokens - 1)
    new = jnp.concatenate([first[:, None], rest], 1)  # (B, N)
    new_valid = jnp.concatenate([jnp.ones_like(first, bool)[:, None], rest_valid], 1)
    return _place(prompts, lengths, new, new_valid)


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "cache_len"))
_decode_jit = jax.jit(_decode, static_argnames=("cfg", "steps"))


# ---------------------------------------------------------------- the public API


def generate(
    params: Params,
    prompts: Int[Array, "B P"],
    key: jax.Array,
    cfg: Config,
    max_new_tokens: int,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    stop_tokens=(),
    prompt_lengths: Int[Array, " B"] | None = None,
) -> tuple[Int[Array, "B P+N"], Bool[Array, "B P+N"]]:
    """Continues each prompt by `max_new_tokens` (N) tokens: → (tokens, valid), both (B, P + N).

    params: θ, or `decode_params(θ, cfg)` to skip rearranging θ on every call.
    prompts (B, P) int, right-padded; prompt_lengths (B,) their lengths (default all P).
    temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off): numbers
    or (B,) arrays. stop_tokens: ids after which a row emits only PAD. P + N <= context.
    See the module docstring for the layout. One jitted program: prefill + `lax.scan`.
    """
    prompts, lengths, settings, stops = _check_inputs(
        params, prompts, cfg, max_new_tokens, prompt_lengths, stop_tokens, (temperature, top_k, top_p, min_p)
    )
    return _generate(params, prompts, lengths, key, settings, stops, cfg, max_new_tokens)


def generate_chunks(
    params: Params,
    prompts: Int[Array, "B P"],
    key: jax.Array,
    cfg: Config,
    max_new_tokens: int,
    chunk: int = 16,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    stop_tokens=(),
    prompt_lengths: Int[Array, " B"] | None = None,
) -> Iterator[tuple[Int[Array, "B C"], Bool[Array, "B C"]]]:
    """`generate`'s new tokens as they are made: yields (tokens, valid), each (B, C).

    The first chunk is the prefill's token (C = 1); then decode runs `chunk` steps per
    jitted scan (the last chunk may be shorter). Concatenated, the chunks are exactly
    `generate`'s new tokens with the same arguments; iteration ends early once every
    row has stopped.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of decode steps, got {chunk!r}")
    prompts, lengths, settings, stops = _check_inputs(
        params, prompts, cfg, max_new_tokens, prompt_lengths, stop_tokens, (temperature, top_k, top_p, min_p)
    )
    cache_len = prompts.shape[1] + max_new_tokens
    layered = params if is_decode_layout(params) else decode_params(params, cfg)
    state, first = _prefill_jit(layered, prompts, lengths, key, settings, stops, cfg, cache_len)
    yield first[:, None], jnp.ones((prompts.shape[0], 1), bool)
    left = max_new_tokens - 1
    while left > 0 and not bool(jnp.all(state["done"])):
        steps = min(chunk, left)
        state, tokens, valid = _decode_jit(layered, state, key, settings, stops, cfg, steps)
        left -= steps
        yield tokens, valid


def _check_inputs(params, prompts, cfg, max_new_tokens, prompt_lengths, stop_tokens, sampling):
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be an llmfn.Config, got {type(cfg).__name__}")
    check_decode_params(params, cfg)
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or 0 in prompts.shape:
        raise ValueError(f"prompts must have shape (B, P) with B, P >= 1, got shape {prompts.shape}: add a batch axis with prompts[None]")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise TypeError(f"prompts must be integer token ids, got dtype {prompts.dtype}")
    B, P = prompts.shape
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if P + max_new_tokens > cfg.context:
        raise ValueError(f"{P} prompt + {max_new_tokens} new tokens exceed the context ({cfg.context}): shorten the prompt or ask for fewer tokens")
    lengths = jnp.full((B,), P, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"prompt_lengths must be integers of shape ({B},), got {lengths.dtype} of shape {lengths.shape}")
    lengths = lengths.astype(jnp.int32)
    if not isinstance(lengths, jax.core.Tracer):
        if int(lengths.min()) < 1 or int(lengths.max()) > P:
            raise ValueError(f"prompt_lengths must lie in 1..{P} (the padded prompt length), got {np.asarray(lengths).tolist()}")
        if not isinstance(prompts, jax.core.Tracer):
            check_tokens(np.where(np.arange(P) < np.asarray(lengths)[:, None], np.asarray(prompts), 0), cfg)
    stops = jnp.asarray(stop_tokens).reshape(-1)
    if stops.size and not jnp.issubdtype(stops.dtype, jnp.integer):
        raise TypeError(f"stop_tokens must be integer token ids, got dtype {stops.dtype}")
    if not isinstance(stops, jax.core.Tracer):
        check_tokens(stops, cfg)
    return prompts.astype(jnp.int32), lengths, _settings(B, *sampling), stops.astype(jnp.int32)
