"""llmfn: a large language model is a function, f_θ(tokens) → logits.

The function and its parameters: `init`, `forward`, `forward_cached`,
`forward_with_intermediates`. Calling it again and again: `generate`. Weights in and
out: `from_hf`, `to_hf`, `load`. Submodules for the rest: `llmfn.train`, `llmfn.data`,
`llmfn.tokenizer`, `llmfn.corpus`, `llmfn.sharding`, `llmfn.inspect`.
"""

from .checkpoint import load
from .config import Config, presets
from .generate import decode_params, generate, generate_chunks
from .hf import from_hf, to_hf
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
    "decode_params",
    "generate",
    "generate_chunks",
    "from_hf",
    "to_hf",
    "load",
]
