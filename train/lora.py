"""LoRA through peft, saved in the key format our loader and ComfyUI's LoRA loader both read.

Training wraps the targeted Linear layers with peft's LoRA layers (`inject_adapter_in_model`: no
PeftModel wrapper, the DiT keeps its own forward). The saved file holds, per adapted layer (official Wan
module names):
    diffusion_model.<module>.lora_A.weight   (rank, in)    "down"
    diffusion_model.<module>.lora_B.weight   (out, rank)   "up"
    diffusion_model.<module>.alpha           scalar        W' = W + alpha / rank * B @ A
`sama_core.loading.merge_lora` and ComfyUI's generic LoRA loader (comfy/lora.py: "diffusion_model.X" keys,
".lora_B.weight"/".lora_A.weight", ".alpha") both apply it with exactly that formula.
"""

from __future__ import annotations

import json
import logging

import torch

from sama_core.errors import SamaInputError

log = logging.getLogger(__name__)

ADAPTER = "default"
PREFIX = "diffusion_model."


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer
    return LoraLayer


def apply_lora(model: torch.nn.Module, lora_cfg, full_modules=()) -> list[str]:
    """Freeze the model, add LoRA adapters to the target layers; `full_modules` train in full. Returns the
    adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model
    targets = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, bias="none")
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise SamaInputError(f"lora.target_modules {targets!r} matches no layer of the DiT ({e}); the default "
                             "adapts every attention q/k/v/o and FFN Linear") from None
    names = [name for name, m in model.named_modules() if isinstance(m, _lora_layer_type())]
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    for module in full_modules:
        try:
            model.get_submodule(module).requires_grad_(True)
        except AttributeError:
            raise SamaInputError(f"lora.full_modules: the DiT has no module {module!r}") from None
    log.info("LoRA rank %d alpha %s on %d layers; trained in full: %s", lora_cfg.rank, lora_cfg.alpha, len(names),
             list(full_modules) or "nothing")
    return names


def lora_state_dict(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapters in the saved format (see the module docstring)."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, _lora_layer_type()) or ADAPTER not in m.lora_A:
            continue
        down = m.lora_A[ADAPTER].weight.detach()  # (rank, in)
        up = m.lora_B[ADAPTER].weight.detach()    # (out, rank)
        rank = down.shape[0]
        # peft scales by lora_alpha / r; storing alpha = scaling * rank keeps that exact for any peft option.
        alpha = float(m.scaling[ADAPTER]) * rank
        out[f"{PREFIX}{name}.lora_A.weight"] = down.to("cpu", dtype).contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = up.to("cpu", dtype).contiguous()
        out[f"{PREFIX}{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not out:
        raise SamaInputError("the model has no LoRA adapters to save")
    return out


def save_lora(model: torch.nn.Module, path, dtype: torch.dtype = torch.float32, metadata: dict | None = None):
    from safetensors.torch import save_file
    sd = lora_state_dict(model, dtype)
    meta = {"format": "pt", "sama_lora": json.dumps(metadata or {})}
    save_file(sd, str(path), metadata=meta)
    return path


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The DiT's own weights in official names (peft's `.base_layer` removed, adapter tensors dropped)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key or ".lora_dropout." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Official-name weights with every adapter folded in: W + scaling * B @ A (computed in float32)."""
    sd = base_state_dict(model)
    for name, m in model.named_modules():
        if isinstance(m, _lora_layer_type()) and ADAPTER in m.lora_A:
            key = f"{name}.weight"
            delta = (m.lora_B[ADAPTER].weight.float() @ m.lora_A[ADAPTER].weight.float()) * m.scaling[ADAPTER]
            sd[key] = (sd[key].float() + delta.to(sd[key].device)).to(sd[key].dtype)
    return sd
