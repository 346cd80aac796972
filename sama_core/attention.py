"""One attention entry point for the whole DiT; the backend is picked once, by name.

Backends (all take q, k, v of shape (B, L, heads, head_dim) and return (B, L, heads * head_dim)):
- "auto":        PyTorch SDPA letting PyTorch choose its kernel (math on CPU). Safe default everywhere.
- "sdpa_cudnn":  SDPA restricted to cuDNN attention, then flash, then efficient (fastest exact on Hopper).
- "sdpa_flash":  SDPA restricted to the flash kernel, then efficient.
- "math":        plain softmax(q k^T / sqrt(d)) v in the input dtype: the readable reference.
- "flash_attn":  the flash-attn package (v3 `flash_attn_interface` or v2), when installed.
- "sage":        sageattention (8-bit QK), when installed; approximate, opt-in only.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import SamaInputError

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _flatten_heads(out: torch.Tensor) -> torch.Tensor:
    return out.flatten(2)  # (B, L, heads, hd) -> (B, L, heads * hd)


def attention_math(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, hd)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return _flatten_heads((weights @ v).transpose(1, 2))


def attention_sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return _flatten_heads(out.transpose(1, 2))


def _sdpa_with(backends) -> AttentionFn:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        if not q.is_cuda:  # the preferred kernels exist on CUDA only; fall back to PyTorch's choice
            return attention_sdpa(q, k, v)
        with sdpa_kernel(backends, set_priority=True):
            return attention_sdpa(q, k, v)
    return run


def _flash_attn() -> AttentionFn:
    try:
        from flash_attn_interface import flash_attn_func  # flash-attention 3 (Hopper)
    except ImportError:
        from flash_attn import flash_attn_func  # flash-attention 2

    def run(q, k, v):
        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return _flatten_heads(out)
    return run


def _sage() -> AttentionFn:
    from sageattention import sageattn

    def run(q, k, v):
        return _flatten_heads(sageattn(q, k, v, tensor_layout="NHD"))
    return run


BACKENDS = ("auto", "sdpa_cudnn", "sdpa_flash", "math", "flash_attn", "sage")


def get_attention(backend: str = "auto") -> AttentionFn:
    """Resolve a backend name to its function, once (at model build), with a clear error."""
    from torch.nn.attention import SDPBackend

    if backend == "auto":
        return attention_sdpa
    if backend == "math":
        return attention_math
    if backend == "sdpa_cudnn":
        return _sdpa_with([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                           SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    if backend == "sdpa_flash":
        return _sdpa_with([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    if backend in ("flash_attn", "sage"):
        try:
            return _flash_attn() if backend == "flash_attn" else _sage()
        except ImportError as e:
            package = "flash-attn" if backend == "flash_attn" else "sageattention"
            raise SamaInputError(
                f"attention backend '{backend}' needs the '{package}' package, which is not installed; "
                f"install it or use attention backend 'auto'") from e
    raise SamaInputError(f"unknown attention backend '{backend}'; choose one of {', '.join(BACKENDS)}")
