"""Tiny random models shared by the tests (importable because tests/ is on sys.path)."""

import torch

from sama_core.config import SamaConfig
from sama_core.model import SamaDiT

TINY = SamaConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=24, freq_dim=32,
                  siglip_dim=48, siglip_hidden_dim=40)
TINY_WAN = SamaConfig(**{**TINY.to_dict(), "has_sama": False})


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every parameter random (no zero biases, no unit norms) so every weight matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_dit(config: SamaConfig = TINY, seed: int = 0, **kwargs) -> SamaDiT:
    return randomize(SamaDiT(config, **kwargs), seed).eval()


def tiny_inputs(config: SamaConfig = TINY, batch=1, frames=2, size=8, text_rows=7, num_semantic=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        target=torch.randn(batch, config.in_dim, frames, size, size, generator=g),
        source=torch.randn(batch, config.in_dim, frames, size, size, generator=g),
        semantic_tokens=torch.randn(batch, num_semantic, config.siglip_dim, generator=g),
        timestep=torch.tensor([700.0] * batch),
        context=torch.randn(batch, text_rows, config.text_dim, generator=g),
    )
