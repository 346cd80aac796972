"""Reading weight files safely, and telling from key names what a checkpoint is.

Every loader in sama_core (DiT, VAE, SigLIP anchors, UMT5 text encoder) reads its files here:
  * `.safetensors` through `safe_open`: listing the key names reads only the header, so a loader can refuse
    a wrong file (say a 28 GB DiT given as the VAE) before a single tensor is read;
  * `.pth` / `.pt` / `.bin` / `.ckpt` only through `torch.load(weights_only=True)` (no code in the file
    can run), memory-mapped so the tensors stay on disk until used; legacy (non-zip) pickles cannot be
    memory-mapped and are read whole;
  * a state dict nested one or more levels down (`{"state_dict": {...}, "epoch": 3}`) is unwrapped, and
    anything but a flat dict of named tensors is refused.

`identify_checkpoint(keys)` names the kind of model a file holds from its key names, for error messages
("it looks like a Wan VAE"). Each loader keeps its own decision of what it accepts and its own advice.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SamaModelFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys under which trainers nest the weights; each holds a dict, never a tensor, so unwrapping is safe.
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module", "vae")


def is_pickle_file(path: str | os.PathLike) -> bool:
    """True for the suffixes read with torch.load (everything else is read as safetensors)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


# ----------------------------------------------------------------------------------------------- reading

class CheckpointFile:
    """One weight file: key names, shapes and metadata up front; tensors read one at a time on demand.

    Works as a context manager; a file kept open (no `with`) stays readable until garbage-collected.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None  # safetensors
        self._tensors: dict[str, torch.Tensor] | None = None  # pickles, memory-mapped
        if is_pickle_file(self.path):
            self._tensors = load_pickle_state_dict(self.path)
            self.metadata: dict[str, str] = {}
        else:
            from safetensors import safe_open

            self._handle = self._safetensors_call(safe_open, str(self.path), framework="pt", device="cpu")
            self.metadata = dict(self._safetensors_call(self._handle.metadata) or {})

    def keys(self) -> list[str]:
        return list(self._tensors) if self._tensors is not None else self._safetensors_call(self._handle.keys)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._safetensors_call(lambda: self._handle.get_slice(key).get_shape()))

    def tensor(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._safetensors_call(self._handle.get_tensor, key)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _safetensors_call(self, fn: Callable, *args, **kwargs):
        """fn(...) with safetensors' and the OS's errors turned into one clear message."""
        from safetensors import SafetensorError

        try:
            return fn(*args, **kwargs)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise SamaModelFileError(
                f"{self.path} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
                f"download it again.") from error


def read_state_dict(path: str | os.PathLike, check_keys: Callable[[list[str]], None] | None = None,
                    rename: Callable[[str], str | None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of one file.

    check_keys(keys) runs on the key names before any tensor is read, so it can refuse a wrong file
    cheaply by raising (a safetensors file's names come from its header; a pickle is memory-mapped first).
    rename(key) gives the name a tensor gets in the result, or None to leave it unread.
    """
    with CheckpointFile(path) as checkpoint:
        keys = checkpoint.keys()
        if check_keys is not None:
            check_keys(keys)
        tensors = {}
        for key in keys:
            name = key if rename is None else rename(key)
            if name is not None:
                tensors[name] = checkpoint.tensor(key)
        return tensors, checkpoint.metadata


def load_pickle_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict of a .pth/.pt/.bin/.ckpt file: torch.load(weights_only=True), memory-mapped."""
    path = Path(path)
    try:
        loaded = _torch_load_weights_only(path)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise SamaModelFileError(
                f"Refused to load {path}: it contains Python objects other than tensors, and loading them "
                f"could run code from the file ({_refusal_reason(error)}). Only plain weight files are "
                f"loaded (torch.load with weights_only=True); use a .safetensors version of this model."
            ) from None
        raise _unreadable_pickle(path, error) from None
    except Exception as error:  # torch.load raises many types for a truncated or foreign file
        raise _unreadable_pickle(path, error) from None
    loaded = _unwrap_nested(loaded)
    if not isinstance(loaded, Mapping):
        raise SamaModelFileError(f"{path} holds a {type(loaded).__name__}, not a flat dictionary of named "
                                 f"tensors: it is not a weight file.")
    odd = next(((k, v) for k, v in loaded.items()
                if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if odd is not None:
        raise SamaModelFileError(
            f"{path} does not hold a flat dictionary of named tensors (entry {odd[0]!r} is a "
            f"{type(odd[1]).__name__}): save only the model's state_dict().")
    return dict(loaded)


def _torch_load_weights_only(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # only legacy (non-zip) files cannot be memory-mapped
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _unwrap_nested(obj):
    while isinstance(obj, Mapping):
        wrapper = next((k for k in NESTED_STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            return obj
        obj = obj[wrapper]
    return obj


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refusal_reason(error: BaseException) -> str:
    """The line of torch's weights-only refusal that names the offending object (its first line only
    suggests weights_only=False, which is exactly what must not be done with an untrusted file)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines[1:] if "unsupported" in line.lower()), _first_line(error))


def _unreadable_pickle(path: Path, error: BaseException) -> SamaModelFileError:
    return SamaModelFileError(
        f"Could not read {path} as a PyTorch weight file ({type(error).__name__}: {_first_line(error)}); it "
        f"may be truncated or not a checkpoint. Check that the download finished, or use a .safetensors "
        f"version.")


# ------------------------------------------------------------------------------------------ identifying

@dataclass(frozen=True)
class CheckpointKind:
    """A kind of model file, recognised when any of its key names matches `pattern` (re.search)."""
    name: str     # stable id, for a loader's own advice: "wan_vae", "umt5", ...
    family: str   # the role it plays: "a VAE", "a text encoder", "a diffusion model", ...
    what: str     # the specific model, for messages: "a Wan VAE"
    pattern: str


_DIFFUSION, _VAE, _IMAGE, _TEXT = "a diffusion model", "a VAE", "an image encoder", "a text encoder"

# First match wins: the more specific kinds come before the broader ones they overlap with (a LoRA before
# the model it patches, SAMA DiT before Wan DiT, a full SD checkpoint's UNet before its VAE, UMT5 before
# T5, OpenAI CLIP before any vision tower), and the broadest patterns (`diffusion_model.` prefix,
# `shared.weight`) come last.
KINDS = (
    CheckpointKind("lora", "a LoRA", "a LoRA", r"lora_(A|B|up|down)\.|\.lora\.|\.alpha$"),
    CheckpointKind("sama_dit", _DIFFUSION, "a SAMA video diffusion model (SAMA DiT)",
                   r"(^|\.)(siglip_feat_mlp|semantic_head|segment_embedding)\."),
    CheckpointKind("wan_vace", _DIFFUSION, "a Wan VACE video diffusion model", r"(^|\.)vace_blocks\."),
    CheckpointKind("wan_i2v", _DIFFUSION, "a Wan image-to-video diffusion model (Wan I2V DiT)",
                   r"(^|\.)img_emb\.|\.k_img\."),
    CheckpointKind("wan_vae", _VAE, "a Wan VAE",
                   r"(^|\.)decoder\.head\.0\.gamma$|(^|\.)(encoder\.downsamples|decoder\.upsamples)\."),
    # diffusers' AutoencoderKLWan keeps Wan's RMS-norm `gamma` inside diffusers-style block names.
    CheckpointKind("wan_vae_diffusers", _VAE, "a Wan VAE in diffusers layout",
                   r"(^|\.)(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\..*\.gamma$"),
    CheckpointKind("flux", _DIFFUSION, "a Flux model", r"(^|\.)(double_blocks|single_blocks)\.\d+\."),
    CheckpointKind("sd_unet", _DIFFUSION, "a Stable Diffusion UNet",
                   r"(^|\.)input_blocks\.\d+\.|^(unet\.)?down_blocks\.\d+\."),
    CheckpointKind("sd_vae", _VAE, "a Stable-Diffusion-style image VAE",
                   r"^(first_stage_model\.)?(encoder|decoder)\.(down|up)\.\d+\.|^first_stage_model\."
                   r"|(^|\.)(post_)?quant_conv\."),
    CheckpointKind("openai_clip_vision", _IMAGE,
                   "an OpenAI-CLIP-style vision encoder (class token), not SigLIP",
                   r"(^|\.)embeddings\.class_embedding$|(^|\.)pre_layrnorm\.|^visual\."
                   r"|(^|\.)transformer\.resblocks\."),
    CheckpointKind("vision", _IMAGE, "a SigLIP-style vision encoder (CLIP vision)",
                   r"(^|\.)vision_model\.|^embeddings\.patch_embedding\."),
    CheckpointKind("clip_text", _TEXT, "a CLIP text encoder",  # transformers 5 drops the text_model. prefix
                   r"(^|\.)text_model\.|^embeddings\.token_embedding\."),
    # UMT5 has a relative position bias in every layer, T5 / mT5 one shared bias in the first layer
    # (so a one-layer UMT5 reads as T5; no real one is that small).
    CheckpointKind("umt5", _TEXT, "a UMT5 text encoder",
                   r"(^|\.)block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\."),
    CheckpointKind("t5_shared_bias", _TEXT,
                   "a T5 / mT5 text encoder with one shared position bias (e.g. Flux/SD3's t5xxl), not UMT5 "
                   "(a position bias in every layer)",
                   r"(^|\.)block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\."),
    CheckpointKind("wan_umt5", _TEXT, "a UMT5 text encoder in Wan's layout",
                   r"^blocks\.\d+\.pos_embedding\.embedding\.weight$"),
    CheckpointKind("wan_t5_shared_bias", _TEXT,
                   "a T5 encoder in Wan's layout with a shared position bias, not UMT5",
                   r"^pos_embedding\.embedding\.weight$"),
    CheckpointKind("t5", _TEXT, "a T5/UMT5 text encoder",
                   r"(^|\.)block\.\d+\.layer\.\d+\.|^shared\.weight$|^token_embedding\.weight$"),
    CheckpointKind("llm", "a language model", "a Llama/Qwen-style language model",
                   r"(^|\.)model\.layers\.\d+\.self_attn\."),
    CheckpointKind("wan_dit", _DIFFUSION, "a Wan video diffusion model (Wan DiT)",
                   r"(^|\.)blocks\.\d+\.(self_attn|cross_attn|attn1|attn2)\.|^(model\.)?diffusion_model\."
                   r"|^(patch_embedding\.|head\.modulation$|condition_embedder\.)"),
)
_COMPILED = tuple((re.compile(kind.pattern), kind) for kind in KINDS)


def identify_checkpoint(keys: Iterable[str]) -> CheckpointKind | None:
    """The first kind (in KINDS order) one of whose patterns a key name matches; None if none does."""
    keys = list(keys)
    for pattern, kind in _COMPILED:
        if any(pattern.search(key) for key in keys):
            return kind
    return None


def describe_checkpoint(keys: Iterable[str]) -> str | None:
    """What a checkpoint looks like from its key names ("a Wan VAE"), or None if unrecognised."""
    kind = identify_checkpoint(keys)
    return kind.what if kind else None
