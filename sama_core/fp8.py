"""fp8 linears through `torch._scaled_mm` (opt-in, approximate).

The DiT blocks' linears (q, k, v, o of both attentions, the FFN) hold ~99% of the 14B weights. Stored
as float8_e4m3fn with a per-tensor or per-output-row scale they take half the memory of bf16, and on
GPUs with fp8 tensor cores (Hopper, Ada) `torch._scaled_mm` runs them at about twice the bf16 rate.
Activations are quantised on the fly with a dynamic per-tensor (or per-row) scale. Embeddings, norms,
modulation and heads stay in the compute dtype.

Written here because neither PyTorch nor diffusers has a drop-in fp8 Linear for inference that takes
ComfyUI's scaled-fp8 files as they are; torchao's float8 targets training and needs its own conversion.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MODES = ("tensor", "row")
# The linears that are converted: every projection inside the transformer blocks.
BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")


def quantize(t: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """t (N, K) -> (fp8 values, float32 scale (N, 1) or (1, 1)) with t ~= values * scale."""
    t = t.float()
    amax = t.abs().amax(dim=1, keepdim=True) if rowwise else t.abs().amax().reshape(1, 1)
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in float8_e4m3fn (scale `weight_scale`) and x quantised per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rowwise: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rowwise = in_features, out_features, rowwise
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=E4M3),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features if rowwise else 1, 1, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rowwise: bool = False) -> "Fp8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, rowwise,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            values, scale = quantize(linear.weight, rowwise)
            q.weight.copy_(values)
            q.weight_scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        if x.is_cuda and (x2.shape[1] % 16 or self.out_features % 16):
            y = x2 @ self.dequantized_weight(x.dtype).t()  # _scaled_mm needs multiples of 16 on CUDA
        else:
            xq, x_scale = quantize(x2, self.rowwise)
            w_scale = self.weight_scale.t() if self.rowwise else self.weight_scale.reshape(())
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale if self.rowwise else x_scale.reshape(()),
                                 scale_b=w_scale, out_dtype=out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fp8 e4m3, scale per {'row' if self.rowwise else 'tensor'}"


def convert_block_linears(model: nn.Module, mode: str = "tensor") -> int:
    """Replace every block linear of a (possibly meta-device) SamaDiT by an Fp8Linear; returns the count.
    Real weights are quantised; on the meta device only the structure changes (weights are assigned later)."""
    if mode not in MODES:
        from .errors import SamaInputError
        raise SamaInputError(f"fp8 mode must be one of {', '.join(MODES)}, got '{mode}'")
    count = 0
    for name, module in list(model.named_modules()):
        if BLOCK_LINEAR.match(name) and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if module.weight.is_meta:
                new = Fp8Linear(module.in_features, module.out_features, module.bias is not None, mode == "row",
                                device="meta", dtype=module.weight.dtype)
            else:
                new = Fp8Linear.from_linear(module, rowwise=mode == "row")
            setattr(parent, child, new)
            count += 1
    return count


def fp8_state_dict(sd: dict, scales: dict, mode: str, dtype: torch.dtype | None = None) -> dict:
    """A state dict for a model converted with convert_block_linears: block linear weights as fp8 +
    `weight_scale` (files already in fp8 keep their values and scales: nothing is upcast), the rest in dtype
    (None: as stored)."""
    rowwise = mode == "row"
    out = {}
    for key, value in sd.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module is not None and BLOCK_LINEAR.match(module):
            if value.dtype == E4M3:
                scale = scales.get(module, torch.ones(1)).float().reshape(-1, 1)
                if rowwise and scale.numel() == 1:
                    scale = scale.expand(value.shape[0], 1).clone()
                elif not rowwise and scale.numel() > 1:  # per-row file scales, per-tensor model: requantise
                    value, scale = quantize(value.float() * scale, rowwise=False)
                out[key], out[module + ".weight_scale"] = value, scale
            else:
                out[key], out[module + ".weight_scale"] = quantize(value, rowwise)
        else:
            out[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return out
