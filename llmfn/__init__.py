"""llmfn: a large language model is a function, f_θ(tokens) → logits."""

from .config import Config, presets
from .model import (
    check_params,
    check_tokens,
    forward,
    forward_cached,
    forward_with_intermediates,
    init,
    init_cache,
    param_count,
    param_shapes,
)

__all__ = [
    "Config",
    "presets",
    "init",
    "forward",
    "forward_cached",
    "forward_with_intermediates",
    "init_cache",
    "check_tokens",
    "check_params",
    "param_count",
    "param_shapes",
]
