"""Model configurations: presets and inference from a checkpoint's tensor shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Mapping

from .errors import SamaModelFileError

# Wan2.1 uses head_dim 128 for every released size; the state dict has no tensor whose shape gives the
# number of heads (the q/k RMSNorm weights span the full dim), so this convention is the only way to
# recover it from shapes alone. Smaller configs carry their config in metadata or a JSON file.
WAN_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class SamaConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    # SAMA additions (section 2 of the reference).
    has_sama: bool = True
    siglip_dim: int = 1152
    siglip_hidden_dim: int = 1024
    num_segment_types: int = 3
    num_semantic_tokens: int = 65
    # Text rows the prompt is padded to before text_embedding (Wan2.1/SAMA: 512, attended unmasked). A
    # small model may use fewer: the padded rows take attention mass from the real tokens.
    text_len: int = 512

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise SamaModelFileError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise SamaModelFileError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SamaConfig":
        """Build from a dict (our own JSON or the official/DiffSynth config.json); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "has_image_input" in d and d["has_image_input"]:
            raise SamaModelFileError("this config is a Wan image-to-video model; SAMA is built on Wan2.1 T2V")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, SamaConfig] = {
    "14B": SamaConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "1.3B": SamaConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Matches ../shared/golden/tiny_sama_config.json: small enough for CPU tests in milliseconds.
    "tiny": SamaConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
}

SAMA_KEY_PREFIXES = ("segment_embedding.", "siglip_feat_mlp.", "semantic_head.")


def infer_config(state_dict: Mapping, num_heads: int | None = None) -> SamaConfig:
    """Infer the DiT config from tensor shapes of a state dict in our (official Wan) key names.

    `num_heads` is taken from the argument when given, else from the Wan convention head_dim = 128.
    """
    def shape(key):
        t = state_dict.get(key)
        if t is None:
            raise SamaModelFileError(f"cannot infer the DiT config: tensor '{key}' is missing")
        return tuple(t.shape)

    pe = shape("patch_embedding.weight")  # (dim, in_dim, pf, ph, pw)
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layer_ids:
        raise SamaModelFileError("cannot infer the DiT config: no 'blocks.N.' tensors")
    head_out = shape("head.head.weight")[0]
    if num_heads is None:
        if dim % WAN_HEAD_DIM:
            raise SamaModelFileError(
                f"cannot infer the number of attention heads for dim {dim}: pass num_heads, or keep a "
                "config JSON next to the file (or in its safetensors metadata)")
        num_heads = dim // WAN_HEAD_DIM
    has_sama = all(any(k.startswith(p) for k in state_dict) for p in SAMA_KEY_PREFIXES)
    kwargs = dict(
        dim=dim, in_dim=in_dim, patch_size=patch, num_heads=num_heads, num_layers=max(layer_ids) + 1,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0], text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1], out_dim=head_out // math.prod(patch), has_sama=has_sama,
    )
    if has_sama:
        fc1 = shape("siglip_feat_mlp.fc1.weight")  # (hidden, siglip_dim)
        kwargs.update(siglip_hidden_dim=fc1[0], siglip_dim=fc1[1],
                      num_segment_types=shape("segment_embedding.weight")[0])
    return SamaConfig(**kwargs)
