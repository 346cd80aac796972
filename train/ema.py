"""Exponential moving average of the trainable weights: shadow <- decay * shadow + (1 - decay) * weight.

Written here rather than taken from diffusers' EMAModel: that class warms its decay up with its own
schedule (so the formula is not the plain one the paper states), and it keeps no names, which the export
and the checkpoint files need. Kept in float32 whatever the training dtype, optionally on the CPU to save
accelerator memory. With FSDP the shadows of sharded (DTensor) weights stay sharded the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, named_parameters: Iterable, decay: float = 0.9998, device: str | None = None):
        self.decay = float(decay)
        self.device = device
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in named_parameters:
            if p.requires_grad:
                self.shadow[name] = _local(p.detach()).to(device=device or _local(p).device,
                                                           dtype=torch.float32, copy=True)

    @torch.no_grad()
    def update(self, named_parameters: Iterable) -> None:
        params = dict(named_parameters)
        for name, shadow in self.shadow.items():
            weight = _local(params[name].detach()).to(shadow.device, torch.float32)
            shadow.mul_(self.decay).add_(weight, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, named_parameters: Iterable) -> None:
        params = dict(named_parameters)
        for name, shadow in self.shadow.items():
            local = _local(params[name].data)
            local.copy_(shadow.to(local.device, local.dtype))

    @contextlib.contextmanager
    def swapped_in(self, named_parameters_fn):
        """Inside the block the model holds the EMA weights; its own weights come back afterwards."""
        params = dict(named_parameters_fn())
        backup = {name: _local(params[name].data).clone() for name in self.shadow}
        self.copy_to(params.items())
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    _local(params[name].data).copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the trainable weights: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        for name, t in state.items():
            self.shadow[name].copy_(t.to(self.shadow[name].device, torch.float32))
