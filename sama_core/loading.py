"""Every way DiT weights arrive -> one state dict in official Wan key names -> a SamaDiT.

Accepted (SAMA_REFERENCE.md sections 1-2):
  (a) official layout: Wan2.1 base shards (`diffusion_pytorch_model-0000k-of-0000n.safetensors` + `.index.json`)
      with the SAMA file layered on top (later files override earlier ones, like `strict=False` loading);
  (b) a single merged safetensors;
  (c) ComfyUI repackaged files: `model.diffusion_model.` prefix, fp16/bf16, fp8_e4m3fn, scaled fp8
      (`scale_weight` tensors + a `scaled_fp8` marker);
  (d) diffusers-format Wan transformer weights (`blocks.N.attn1.to_q`, `scale_shift_table`, `proj_out`, ...);
  (e) `.pth` files, only through `torch.load(weights_only=True)`.

The model is built on the meta device and the tensors are assigned, so peak memory stays near one copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .checkpoints import identify_checkpoint, read_state_dict
from .config import SAMA_KEY_PREFIXES, SamaConfig, infer_config
from .errors import SamaFileNotFoundError, SamaModelFileError

log = logging.getLogger(__name__)

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# Top-level modules of an official-name Wan DiT (with SAMA_KEY_PREFIXES: what makes a file a DiT file).
_DIT_KEY_PREFIXES = ("blocks.", "head.", "patch_embedding.", "text_embedding.", "time_embedding.",
                     "time_projection.")
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))

# diffusers WanTransformer3DModel name -> official Wan name (first matching rule wins).
_DIFFUSERS_RULES = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' affine cross-attn norm is Wan's norm3
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]

# The DiT loader's advice for some kinds of wrong file (checkpoints.identify_checkpoint names them).
_ADVICE_FOR_KIND = {
    "lora": " (load it as a LoRA, not as the DiT)",
    "wan_i2v": " (SAMA is built on the T2V model)",
}
# Kinds named from DiT-like key names: never the right word for a file with no Wan DiT name at all.
_DIT_KINDS = ("wan_dit", "sama_dit")


@dataclasses.dataclass
class LoadedWeights:
    """A state dict in official names plus what was learned about the files it came from."""
    state_dict: dict
    files: list
    formats: list          # one description per file: "safetensors", "comfyui", "diffusers", "scaled fp8", ...
    metadata_config: dict | None = None
    fp8_scales: dict = dataclasses.field(default_factory=dict)  # keep_fp8: module -> scale of its fp8 weight


# ---------------------------------------------------------------------------------------------- reading

def expand_paths(paths: str | os.PathLike | Sequence) -> list[Path]:
    """Files to read, in layering order. A folder or an `.index.json` expands to its shards."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise SamaFileNotFoundError(f"model file not found: {p}")
        if p.is_dir():
            out.extend(_files_in_folder(p))
        elif p.name.endswith(".index.json"):
            out.extend(_shards_of_index(p))
        else:
            out.extend(_whole_shard_set(p))
    return out


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<ext>\.[A-Za-z0-9]+)$")


def _whole_shard_set(file: Path) -> list[Path]:
    """One shard of a sharded checkpoint (what a file picker like ComfyUI's offers) stands for all of them."""
    match = _SHARD_NAME.match(file.name)
    if not match:
        return [file]
    index = file.with_name(f"{match['stem']}{match['ext']}.index.json")
    if index.exists():
        return _shards_of_index(index)
    count = int(match["count"])
    shards = [file.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}{match['ext']}") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise SamaFileNotFoundError(f"{file.name} is one of {count} shards, but {missing} are not in {file.parent}; "
                                    "download every shard of the checkpoint")
    return shards


def _files_in_folder(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _shards_of_index(indexes[0])
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    if not files:
        raise SamaFileNotFoundError(f"no .safetensors or .pth weights in folder {folder}")
    return files


def _shards_of_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise SamaModelFileError(f"{index} is not a valid sharded-checkpoint index (no 'weight_map')") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise SamaFileNotFoundError(f"{index.name} lists shards that are not in {index.parent}: {missing}; "
                                    "download every shard of the checkpoint")
    return shards


# ---------------------------------------------------------------------------------------------- conversion

def strip_prefix(sd: dict) -> tuple[dict, str | None]:
    for prefix in COMFY_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, None


def is_diffusers_layout(sd: Mapping) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1.to_q." in k for k in sd)


def diffusers_to_official(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _DIFFUSERS_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def dequantize_scaled_fp8(sd: dict, dtype: torch.dtype) -> dict:
    """ComfyUI scaled fp8: weight_fp8 * scale_weight (per tensor or per output row); drop input scales."""
    out = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith(".scale_input") or key.endswith(".scale_weight"):
            continue
        scale = sd.get(key[: -len("weight")] + "scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            scale = scale.to(torch.float32)
            w = value.to(torch.float32)
            value = (w * scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.numel() > 1 else w * scale).to(dtype)
        out[key] = value
    return out


def _official_key_names(keys: Iterable[str]) -> list[str]:
    """The names keys get in to_official (prefix stripped, diffusers names mapped), from names alone."""
    names, _ = strip_prefix(dict.fromkeys(keys))
    if is_diffusers_layout(names):
        names = diffusers_to_official(names)
    return list(names)


def _refuse_if_not_dit_keys(keys: list[str], file: Path) -> None:
    """Refuse, on key names alone (before any tensor is read), a file with no Wan DiT / SAMA tensor."""
    if not keys:
        raise SamaModelFileError(f"{file} holds no tensors")
    kind = identify_checkpoint(keys)
    if kind is not None and kind.name == "lora":  # LoRA keys carry DiT module names: catch them first
        raise SamaModelFileError(f"{file} is a LoRA, not a DiT: apply it with --lora FILE:STRENGTH (or ComfyUI's "
                                 "LoRA loader) on top of the SAMA model")
    if any(k.startswith(_DIT_KEY_PREFIXES + SAMA_KEY_PREFIXES) for k in _official_key_names(keys)):
        return
    kind = identify_checkpoint(keys)
    if kind is None or kind.name in _DIT_KINDS:
        what = "none of its tensors has a Wan DiT name"
    else:
        what = f"it looks like {kind.what}{_ADVICE_FOR_KIND.get(kind.name, '')}"
    raise SamaModelFileError(f"{file} is not a Wan2.1/SAMA DiT file: {what}. Give the DiT "
                             "(models/diffusion_models) file here.")


def to_official(sd: dict, dtype: torch.dtype | None, keep_fp8: bool = False) -> tuple[dict, list[str], dict]:
    """One file's tensors -> official names and the target dtype; returns the format tags it showed and,
    with keep_fp8, the scales of the fp8 block-linear weights it left in fp8 (nothing is upcast for them).
    (Files without DiT tensors were refused on their key names by _refuse_if_not_dit_keys.)"""
    from .fp8 import BLOCK_LINEAR
    tags, scales = [], {}
    sd, prefix = strip_prefix(sd)
    if prefix:
        tags.append(f"comfyui prefix '{prefix}'")
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
        tags.append("diffusers names")

    def stays_fp8(key):
        return keep_fp8 and key.endswith(".weight") and BLOCK_LINEAR.match(key[: -len(".weight")]) is not None

    if "scaled_fp8" in sd or any(k.endswith(".scale_weight") for k in sd):
        tags.append("scaled fp8")
        if keep_fp8:
            scales = {k[: -len(".scale_weight")]: v for k, v in sd.items()
                      if k.endswith(".scale_weight") and stays_fp8(k[: -len("scale_weight")] + "weight")}
            sd = {k: v for k, v in sd.items() if not (k.endswith(".scale_weight") and k[: -len(".scale_weight")]
                                                      in scales)}
        sd = dequantize_scaled_fp8(sd, dtype or torch.bfloat16)
    if any(v.dtype in FP8_DTYPES for v in sd.values()):
        tags.append("fp8")
        target = dtype or torch.bfloat16
        sd = {k: v.to(target) if v.dtype in FP8_DTYPES and not stays_fp8(k) else v for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and v.dtype not in FP8_DTYPES else v for k, v in sd.items()}
    return sd, tags, scales


def refuse_non_finite(sd: Mapping, file: Path) -> None:
    """NaN/inf weights make every output NaN: name them at load time instead of failing mid-sampling."""
    bad = [k for k, v in sd.items()
           if v.is_floating_point() and v.dtype not in FP8_DTYPES and not torch.isfinite(v).all()]
    if bad:
        raise SamaModelFileError(f"{file} has NaN/inf values in {len(bad)} tensor(s), e.g. {bad[:3]}: the file is "
                                 "damaged (or was saved after training diverged); download or export it again")


def read_weights(paths, dtype: torch.dtype | None = None, keep_fp8: bool = False) -> LoadedWeights:
    """Read and layer every file (later files override earlier ones) into official names."""
    files = expand_paths(paths)
    merged, formats, meta_config, scales = {}, [], None, {}
    for file in files:
        # The key names are checked before any tensor is read: a wrong (maybe huge) file is refused unread.
        check = functools.partial(_refuse_if_not_dit_keys, file=file)
        tensors, metadata = read_state_dict(file, check_keys=check)
        sd, tags, file_scales = to_official(tensors, dtype, keep_fp8)
        scales.update(file_scales)
        refuse_non_finite(sd, file)
        if "sama_config" in metadata:
            meta_config = json.loads(metadata["sama_config"])
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
        formats.append(f"{file.name}: {file.suffix.lstrip('.')} ({', '.join(dtypes)})"
                       + (f" [{'; '.join(tags)}]" if tags else ""))
        merged.update(sd)
    return LoadedWeights(merged, files, formats, meta_config, scales)


def sidecar_config(files: Sequence[Path]) -> dict | None:
    """A config JSON next to the weights: `<stem>_config.json`, `<stem>.json`, or the folder's config.json."""
    for f in reversed(files):
        for cand in (f.with_name(f.stem + "_config.json"), f.with_suffix(".json"), f.parent / "config.json"):
            if cand.exists() and cand != f:
                try:
                    d = json.loads(cand.read_text())
                except ValueError:
                    continue
                if "num_attention_heads" in d:  # diffusers config.json
                    d = dict(d, num_heads=d["num_attention_heads"])
                if "num_heads" in d:
                    return d
    return None


def resolve_config(weights: LoadedWeights, config=None) -> SamaConfig:
    """Shapes decide the config; the number of heads comes from (in order) the explicit config, the
    file's metadata, a sidecar JSON, else the Wan head_dim-128 convention."""
    if isinstance(config, SamaConfig):
        given = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        given = json.loads(Path(config).read_text())
    else:
        given = dict(config) if config else (weights.metadata_config or sidecar_config(weights.files) or {})
    inferred = infer_config(weights.state_dict, num_heads=given.get("num_heads"))
    mismatched = {k: (given[k], getattr(inferred, k)) for k in ("dim", "num_layers", "ffn_dim", "text_dim")
                  if k in given and given[k] != getattr(inferred, k)}
    if mismatched:
        raise SamaModelFileError(f"config does not match the weights' shapes (config, weights): {mismatched}")
    # Not visible in any shape: the number of text rows the DiT pads the prompt to (512 in Wan2.1/SAMA;
    # small models may be trained with fewer, see SamaConfig.text_len).
    if "text_len" in given:
        text_len = given["text_len"]
        if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 1:
            raise SamaModelFileError(f"config text_len must be a positive integer, got {text_len!r}")
        inferred = dataclasses.replace(inferred, text_len=text_len)
    return inferred


# ---------------------------------------------------------------------------------------------- checking

@dataclasses.dataclass
class KeyReport:
    missing: list
    unexpected: list

    def summary(self, limit: int = 8) -> str:
        def short(keys):
            # Collapse per-block keys into one pattern so 40 blocks read as one line.
            pats = sorted({re.sub(r"blocks\.\d+\.", "blocks.N.", k) for k in keys})
            return ", ".join(pats[:limit]) + (f" (+{len(pats) - limit} more)" if len(pats) > limit else "")
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {short(self.unexpected)}")
        return "; ".join(parts) or "all keys matched"


def check_keys(model_keys: Iterable[str], sd_keys: Iterable[str]) -> KeyReport:
    model_keys, sd_keys = set(model_keys), set(sd_keys)
    return KeyReport(sorted(model_keys - sd_keys), sorted(sd_keys - model_keys))


# ---------------------------------------------------------------------------------------------- building

def build_model(config: SamaConfig, state_dict: dict, *, operations=None, attention_backend="auto",
                device="cpu", strict: bool = True, fp8: str | None = None, rope: str = "exact"):
    """Build on the meta device and assign the tensors (no second copy of the weights). With fp8
    ("tensor" / "row"), the block linears are fp8 `_scaled_mm` layers (see fp8.py)."""
    from .model import SamaDiT
    with torch.device("meta"):
        model = SamaDiT(config, operations=operations, attention_backend=attention_backend, rope=rope)
    if fp8:
        from .fp8 import convert_block_linears
        convert_block_linears(model, fp8)
    report = check_keys(model.state_dict().keys(), state_dict.keys())
    if strict and (report.missing or report.unexpected):
        raise SamaModelFileError(f"the weights do not fit a {describe_config(config)} DiT: {report.summary()}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise SamaModelFileError(f"weights missing for {len(still_meta)} tensors, e.g. {still_meta[:3]}")
    return model.to(device).eval()


def describe_config(config: SamaConfig) -> str:
    size = {5120: "14B", 1536: "1.3B"}.get(config.dim, f"dim-{config.dim}")
    return f"Wan2.1 {size}{' + SAMA' if config.has_sama else ''}"


def load_dit(paths, *, config=None, dtype: torch.dtype | None = None, device="cpu", operations=None,
             attention_backend: str = "auto", allow_plain_wan: bool = False, fp8: str | None = None,
             rope: str = "exact"):
    """Load a SAMA DiT from any accepted layout. `paths`: one file, a folder, an index, or a list
    (base shards first, SAMA file last). A plain Wan2.1 file is refused unless `allow_plain_wan`.
    fp8 = "tensor" / "row": block linears stored in fp8 and run with torch._scaled_mm; fp8 files keep
    their fp8 values (never upcast), others are quantised tensor by tensor while loading."""
    weights = read_weights(paths, dtype=dtype, keep_fp8=bool(fp8))
    cfg = resolve_config(weights, config)
    if not cfg.has_sama:
        present = [p.rstrip(".") for p in SAMA_KEY_PREFIXES if any(k.startswith(p) for k in weights.state_dict)]
        if not allow_plain_wan:
            hint = (f" (only {', '.join(present)} found)" if present else "")
            raise SamaModelFileError(
                f"this is a Wan2.1 base model without the SAMA parts{hint}: load the SAMA weights on top "
                "(pass the base file(s) first and the SAMA safetensors last)")
        weights.state_dict = {k: v for k, v in weights.state_dict.items() if not k.startswith(SAMA_KEY_PREFIXES)}
    sd = weights.state_dict
    if fp8:
        from .fp8 import fp8_state_dict
        sd = fp8_state_dict(sd, weights.fp8_scales, fp8, dtype)
    model = build_model(cfg, sd, operations=operations, attention_backend=attention_backend, device=device,
                        fp8=fp8, rope=rope)
    log.info("loaded %s from %s", describe_config(cfg), "; ".join(weights.formats))
    return model


def save_dit(model_or_sd, path, config: SamaConfig | None = None):
    """Save in official names as safetensors with the config in the metadata (so heads are known)."""
    from safetensors.torch import save_file
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    config = config or getattr(model_or_sd, "config", None)
    metadata = {"format": "pt"}
    if config is not None:
        metadata["sama_config"] = config.to_json()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def inspect(paths, config=None) -> dict:
    """What a file (or set of files) is: used by `python -m sama_core info`."""
    weights = read_weights(paths)
    sd = weights.state_dict
    report = {"files": [str(f) for f in weights.files], "formats": weights.formats,
              "tensors": len(sd), "parameters": sum(v.numel() for v in sd.values())}
    try:
        cfg = resolve_config(weights, config)
    except SamaModelFileError as e:
        report["config"] = None
        report["problem"] = str(e)
        return report
    report["config"] = cfg.to_dict()
    report["model"] = describe_config(cfg)
    report["sama_parts"] = {p.rstrip("."): any(k.startswith(p) for k in sd) for p in SAMA_KEY_PREFIXES}
    from .model import SamaDiT
    with torch.device("meta"):
        keys = SamaDiT(cfg).state_dict().keys()
    report["keys"] = check_keys(keys, sd.keys()).summary()
    if not cfg.has_sama:
        report["problem"] = "Wan2.1 base model without the SAMA parts: load the SAMA weights on top"
    return report


# ---------------------------------------------------------------------------------------------- LoRA

_LORA_SUFFIXES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up",
                  "lora_up.weight": "up", "alpha": "alpha"}
_LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")


def _lora_groups(sd: Mapping) -> dict:
    """{module path in official names: {"down", "up", "alpha"}} from peft/diffusers, ComfyUI or kohya keys."""
    groups: dict = {}
    for key, value in sd.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            continue
        module = key[: -len(suffix) - 1]
        for prefix in _LORA_PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix):]
                break
        groups.setdefault(module, {})[_LORA_SUFFIXES[suffix]] = value
    return groups


def merge_lora(model, path, strength: float = 1.0) -> int:
    """Merge a LoRA file into the model's Linear weights: W += strength * alpha/rank * up @ down.

    Written here rather than through peft: applying a saved LoRA file to plain modules is this one
    matrix product, while peft would need its adapter config and wrapper modules around every layer.
    Returns the number of layers changed; unknown layer names are an error (a LoRA for another model).
    """
    tensors, _ = read_state_dict(path)
    groups = _lora_groups(tensors)
    if not groups:
        raise SamaModelFileError(f"{path} holds no LoRA tensors (lora_A/lora_B or lora_down/lora_up)")
    modules = dict(model.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules}
    changed = 0
    unknown = []
    for name, parts in groups.items():
        official = diffusers_to_official({name + ".weight": None})
        name = next(iter(official))[: -len(".weight")]
        if name.startswith("lora_unet_"):
            name = underscored.get(name[len("lora_unet_"):], name)
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "weight") or "down" not in parts or "up" not in parts:
            unknown.append(name)
            continue
        down, up = parts["down"].float(), parts["up"].float()  # (r, in), (out, r)
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        with torch.no_grad():
            delta = (up @ down) * (scale * strength)
            layer.weight.add_(delta.to(layer.weight.dtype).to(layer.weight.device).view_as(layer.weight))
        changed += 1
    if unknown:
        raise SamaModelFileError(f"{path}: {len(unknown)} LoRA layers do not exist in this DiT, e.g. "
                                 f"{unknown[:3]}; is it a LoRA for another model?")
    log.info("merged LoRA %s (strength %s) into %d layers", path, strength, changed)
    return changed
