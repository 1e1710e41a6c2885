"""Model configuration: one frozen, hashable dataclass and a table of presets.

A `Config` is passed to jitted functions as a static argument, so it must be hashable
(frozen dataclass of plain Python values) and it fully determines the shapes of θ.
"""

import dataclasses
from typing import Literal

Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu", "relu"]
Positions = Literal["learned", "rope"]
Dtype = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that fixes the shape and arithmetic of f_θ.

    Defaults give the small model that `python train.py` fits on a 2-core CPU.
    """

    vocab_size: int = 256  # V: 256 = byte-level tokenizer
    context: int = 128  # longest sequence the model accepts (learned position table size)
    n_layers: int = 4  # L
    d_model: int = 128  # D: width of the residual stream
    n_heads: int = 4  # H: query heads; head dim K = D / H
    n_kv_heads: int | None = None  # G: key/value heads (grouped-query attention); None = H
    d_ff: int | None = None  # F: MLP hidden width; None = 4 D
    norm: Norm = "layernorm"  # LayerNorm (GPT-2) or RMSNorm (Llama)
    norm_eps: float = 1e-5
    mlp: Mlp = "gelu"  # GELU (tanh approximation, GPT-2), SwiGLU (Llama), ReLU (textbook)
    positions: Positions = "learned"  # learned table (GPT-2) or rotary (Llama)
    rope_theta: float = 10_000.0  # RoPE base; Llama 3 uses 500 000
    bias: bool = True  # biases in attention and MLP projections (GPT-2 yes, Llama no)
    tie_embeddings: bool = True  # output head = input embedding transposed (GPT-2)
    dtype: Dtype = "float32"  # compute dtype; params, softmax and logits stay float32
    scan_layers: bool = True  # lax.scan over layers: compile time flat in depth
    init_std: float = 0.02  # std of the normal initialisation (GPT-2)

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layers", "d_model", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Config.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "choose a width that is a multiple of the number of heads"
            )
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"Config.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                "each key/value head must serve a whole group of query heads"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"Config.d_ff must be positive, got {self.d_ff}")

    @property
    def head_dim(self) -> int:
        """K, the width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """G, the number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        """F, the MLP hidden width."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def replace(self, **changes) -> "Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _gpt2(n_layers: int, d_model: int, n_heads: int) -> Config:
    return Config(vocab_size=50257, context=1024, n_layers=n_layers, d_model=d_model, n_heads=n_heads)


def _llama(vocab_size, context, d_ff, n_kv_heads, rope_theta) -> Config:
    return Config(
        vocab_size=vocab_size, context=context, n_layers=32, d_model=4096, n_heads=32,
        n_kv_heads=n_kv_heads, d_ff=d_ff, norm="rmsnorm", mlp="swiglu", positions="rope",
        rope_theta=rope_theta, bias=False, tie_embeddings=False,
    )


# name → Config; parameter counts are checked against the published figures in tests.
presets: dict[str, Config] = {
    "small": Config(),  # 0.84M params (0.94M with the default BPE-1024 tokenizer): minutes on a 2-core CPU
    "gpt2": _gpt2(12, 768, 12),  # 124,439,808
    "gpt2-medium": _gpt2(24, 1024, 16),  # 354,823,168
    "gpt2-large": _gpt2(36, 1280, 20),  # 774,030,080
    "gpt2-xl": _gpt2(48, 1600, 25),  # 1,557,611,200
    "llama2-7b": _llama(32000, 4096, 11008, None, 10_000.0),  # 6,738,415,616
    "llama3-8b": _llama(128256, 8192, 14336, 8, 500_000.0),  # 8,030,261,248
}
