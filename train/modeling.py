"""The DiT to train: loaded from files (a SAMA model, stage 0's export, or a Wan2.1 base that gets fresh
SAMA parts) or randomly initialised from a preset / explicit config (tests, smoke runs)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sama_core.config import PRESETS, SAMA_KEY_PREFIXES, SamaConfig
from sama_core.errors import SamaInputError, SamaModelFileError
from sama_core.loading import check_keys, read_weights, resolve_config
from sama_core.model import SamaDiT

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuiltModel:
    model: SamaDiT
    fresh_modules: list            # modules initialised here rather than loaded (the SAMA parts of a base)
    source: str                    # where the weights came from (for the logs)


def model_config(cfg) -> SamaConfig:
    mc = cfg.model
    if mc.preset is not None:
        if mc.preset not in PRESETS:
            raise SamaInputError(f"model.preset {mc.preset!r} is not one of {', '.join(PRESETS)}")
        base = PRESETS[mc.preset].to_dict()
        return SamaConfig.from_dict({**base, **(mc.config or {})})
    return SamaConfig.from_dict(mc.config)


def init_paths(cfg) -> list:
    paths = cfg.model.init_from
    paths = [paths] if isinstance(paths, str) else list(paths)
    return [str(cfg.resolve_path(p)) for p in paths]


def _init_fresh_sama_parts(model: SamaDiT, seed: int) -> None:
    """Materialise and initialise the SAMA modules a base checkpoint lacks. The segment embedding starts at
    zero, so at step 0 the tokens carry no type offset (what the released code does for a base without
    it); the semantic MLP and head take PyTorch's default initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix in SAMA_KEY_PREFIXES:
            module = model.get_submodule(prefix.rstrip("."))
            module.to_empty(device="cpu")
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
    with torch.no_grad():
        model.segment_embedding.weight.zero_()


def build_dit(cfg) -> BuiltModel:
    mc = cfg.model
    if mc.init_from is None:
        config = model_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = SamaDiT(config, attention_backend=mc.attention_backend)
        log.info("randomly initialised DiT %s", config.to_json())
        return BuiltModel(model.float().train(), [], "random init")

    paths = init_paths(cfg)
    weights = read_weights(paths, dtype=torch.float32)
    config = resolve_config(weights, mc.config)
    sd = weights.state_dict
    fresh = []
    if not config.has_sama:
        # The SAMA widths cannot come from a base's shapes: model.config, else the file's metadata, else
        # SAMA-14B's (SigLIP so400m 1152 -> 1024 -> dim).
        sama_fields = ("siglip_dim", "siglip_hidden_dim", "num_segment_types")
        given = {**(weights.metadata_config or {}), **(mc.config or {})}
        config = dataclasses.replace(config, has_sama=True, **{k: given[k] for k in sama_fields if k in given})
        fresh = [p.rstrip(".") for p in SAMA_KEY_PREFIXES if not any(k.startswith(p) for k in sd)]
    with torch.device("meta"):
        model = SamaDiT(config, attention_backend=mc.attention_backend)
    report = check_keys(model.state_dict().keys(), sd.keys())
    loadable_missing = [k for k in report.missing if not k.startswith(tuple(f + "." for f in fresh))]
    if report.unexpected or loadable_missing:
        raise SamaModelFileError(f"model.init_from {paths} does not fit a SAMA DiT: {report.summary()}")
    model.load_state_dict(sd, strict=False, assign=True)
    if fresh:
        if set(fresh) != {p.rstrip(".") for p in SAMA_KEY_PREFIXES}:
            raise SamaModelFileError(f"model.init_from has only part of the SAMA modules (missing {fresh}); give "
                                     "the complete SAMA file on top of the base")
        _init_fresh_sama_parts(model, cfg.seed)
        log.info("initialised fresh SAMA parts %s on top of %s", fresh, paths)
    return BuiltModel(model.float().train(), fresh, ", ".join(paths))
