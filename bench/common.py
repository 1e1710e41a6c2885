"""What the machine can do, measured in the same run as the thing being compared to it.

Every bench script divides by these figures rather than by a datasheet number, so a ratio
printed on a busy laptop and one printed on a quiet server mean the same thing.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def cores() -> int:
    """CPU cores this process may run on (what both JAX and PyTorch are given)."""
    return len(os.sched_getaffinity(0))


def seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls.

    `fn` must block until its work is done (call `.block_until_ready()` inside).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of each `fns[name]()`, timed in alternation.

    Alternating A, B, A, B, ... makes both sides see the same background load, so the
    ratio of the medians stays meaningful on a shared machine where absolute times do not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_chain(n: int = 1024, dtype=jnp.float32):
    """A blocking callable doing ten chained jitted (n, n) @ (n, n) matmuls, and its FLOP count.

    Ten products per call keep the dispatch overhead out of the figure; time it next to
    the thing being measured (see `interleaved`) to get the matmul rate under the same load.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), dtype) / np.sqrt(n).astype(dtype)

    @jax.jit
    def chain(x):
        for _ in range(10):
            x = x @ a
        return x

    return (lambda: chain(a).block_until_ready()), 10 * 2 * n**3


def matmul_flops_per_s(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of jitted (n, n) @ (n, n) matmuls on JAX's default device."""
    run, flops = matmul_chain(n, dtype)
    return flops / seconds(run, repeats)


def copy_bytes_per_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s of a jitted, donated array update (bytes read + written).

    Decoding reads every weight and the whole KV cache once per token, so this — not
    the matmul rate — is the roofline a decode benchmark should be compared against.
    The buffer is donated, so no call pays for faulting in fresh pages.
    """
    state = {"x": jnp.ones((megabytes * 2**20 // 4,), jnp.float32)}
    nbytes = state["x"].nbytes
    step = jax.jit(lambda y: y + 1.0, donate_argnums=0)

    def copy():
        state["x"] = step(state["x"])
        state["x"].block_until_ready()

    return 2 * nbytes / seconds(copy, repeats, warmup=2)


def train_flops_per_token(n_params: int, n_layers: int, d_model: int, context: int) -> float:
    """Training FLOPs per token: 6 N for the matmuls, 12 L D T for attention (PaLM's formula)."""
    return 6 * n_params + 12 * n_layers * d_model * context
