"""UMT5-XXL text encoder for headless SAMA, through transformers' ``UMT5EncoderModel``.

Inside ComfyUI the native CLIP loader encodes the prompts; this module is the headless path (CLI,
pipeline, training feature cache). It loads from local files only, in any of these layouts:

  (a) a Hugging Face folder: ``config.json`` + weights (single file, or shards with an index), with
      the tokenizer files beside them (``tokenizer.json`` / ``spiece.model``); a diffusers Wan
      pipeline folder (``text_encoder/`` + ``tokenizer/``) is accepted too;
  (b) ComfyUI's single file ``umt5_xxl_*.safetensors`` (fp16/bf16, fp8_e4m3fn, scaled fp8): the key
      names are transformers' own; the tokenizer comes from its embedded ``spiece_model`` tensor;
  (c) Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own module names, renamed here), with the
      tokenizer from a ``google/umt5-xxl`` folder beside it or from ``tokenizer_path``.

How the released SAMA pipeline encodes text, and what `TextEncoder.encode` returns:
  prompt -> cleaned (prompts.clean_prompt) -> sentencepiece ids + EOS, truncated to 512 tokens
  (the real length includes EOS) -> UMT5 encoder with padding masked -> (B, 512, 4096) with the rows
  after each sample's real length set to zero. The DiT cross-attends to all 512 rows.

Why some of this is written by hand: transformers' ``from_pretrained`` covers only layout (a).
For (b) and (c) there is no library loader, so the config is inferred from tensor shapes and the
model is built on the meta device and filled with ``load_state_dict(assign=True)``; (a) goes through
the same path so every layout gets the same dtype handling, memory behaviour and error messages.
Peak memory stays near one copy of the weights in the compute dtype.
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .checkpoints import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointFile, identify_checkpoint
from .errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError
from .prompts import clean_prompt, edit_prompt, negative_prompt

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # rows the DiT cross-attends to (released SAMA / Wan2.1)
RELATIVE_ATTENTION_MAX_DISTANCE = 128  # UMT5 and Wan's T5 both use 128; not stored in any file

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}

# Key of the first layer's query projection in transformers' naming (also ComfyUI's).
_HF_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # tied to shared.weight in UMT5EncoderModel

# ComfyUI extras that are not weights: fp8 scale factors, the fp8 marker, the tokenizer bytes.
_SCALE_WEIGHT_SUFFIX = ".scale_weight"
_SCALE_INPUT_SUFFIX = ".scale_input"
_SCALED_FP8_MARKER = "scaled_fp8"
_SPIECE_KEY = "spiece_model"

_FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bf16' / 'fp16' (or the torch dtype itself) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise SamaInputError(f"Text encoder dtype {dtype!r} is not supported; use 'fp32', 'bf16' or 'fp16'.")


# ----------------------------------------------------------------------------------------------
# Wan's T5 names -> transformers' UMT5 names
# ----------------------------------------------------------------------------------------------

# Wan's T5Encoder (wan/modules/t5.py, umt5_xxl with shared_pos=False) has one relative position
# embedding per block, like UMT5. Its gated feed-forward computes fc1(x) * gelu(gate(x)), and
# transformers computes wi_1(x) * gelu(wi_0(x)): gate -> wi_0, fc1 -> wi_1, fc2 -> wo.
_WAN_TOP_LEVEL = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_WAN_BLOCK_PARTS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WAN_PROBE = "blocks.0.attn.q.weight"


def wan_t5_key_to_transformers(key: str) -> str | None:
    """Transformers' UMT5 name of one key of Wan's T5 encoder file; None if it is not one."""
    if key in _WAN_TOP_LEVEL:
        return _WAN_TOP_LEVEL[key]
    match = _WAN_BLOCK_KEY.match(key)
    if match and match.group(2) in _WAN_BLOCK_PARTS:
        return f"encoder.block.{match.group(1)}.{_WAN_BLOCK_PARTS[match.group(2)]}"
    return None


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files lazily (keys and shapes first, tensors one at a time)
# ----------------------------------------------------------------------------------------------

class _CheckpointReader:
    """Keys, shapes and tensors of one or more weight files, loading one tensor at a time."""

    def __init__(self, paths: Sequence[pathlib.Path]):
        self.paths = list(paths)
        self._file_of: dict[str, CheckpointFile] = {}  # kept open: tensors are read while the model is built
        for path in self.paths:
            if not path.name.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
                raise SamaModelFileError(
                    f"Text encoder file {path} has an unknown format ({path.suffix!r}). "
                    "Give a .safetensors file (ComfyUI/Hugging Face) or Wan's .pth file."
                )
            checkpoint = CheckpointFile(path)
            for key in checkpoint.keys():
                self._file_of[key] = checkpoint

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file_of[key].shape(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self._file_of[key].tensor(key)


# ----------------------------------------------------------------------------------------------
# What kind of file is it?
# ----------------------------------------------------------------------------------------------

# Kinds a damaged or partial UMT5 file can look like: naming them would only confuse.
_UMT5_LOOKALIKES = ("umt5", "wan_umt5", "t5")


def _looks_like(keys: Sequence[str]) -> str:
    """What a file given as the text encoder looks like instead; another role is named first."""
    kind = identify_checkpoint(keys)
    if kind is None or kind.name in _UMT5_LOOKALIKES:
        preview = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return f"not a recognised model (first keys: {preview or 'none'})"
    if kind.family in ("a text encoder", kind.what):
        return kind.what
    return f"{kind.family}: {kind.what}"


def _wrong_kind_error(path: pathlib.Path, keys: Sequence[str]) -> SamaModelFileError:
    return SamaModelFileError(
        f"{path} is not a UMT5-XXL text encoder: it looks like {_looks_like(list(keys))}. "
        "Give the UMT5 encoder instead: ComfyUI's umt5_xxl_*.safetensors (models/text_encoders), "
        "Wan's models_t5_umt5-xxl-enc-bf16.pth, or a Hugging Face umt5-xxl folder."
    )


# ----------------------------------------------------------------------------------------------
# State dict in transformers' names + config inferred from shapes
# ----------------------------------------------------------------------------------------------

def _map_keys_to_transformers(path: pathlib.Path, keys: Sequence[str]) -> dict[str, str]:
    """{transformers name: key in the file} for every weight; extras (fp8 scales, tokenizer,
    a seq2seq decoder) are left out. Raises if the file is not a UMT5 encoder."""
    keyset = set(keys)
    hf_probe = next((key for key in keys if key.endswith(_HF_PROBE)), None)
    if hf_probe is not None:
        prefix = hf_probe[: -len(_HF_PROBE)]  # e.g. "" or "text_encoders.umt5xxl.transformer."
        mapping = {}
        for key in keys:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name == "shared.weight" or name.startswith("encoder."):
                if not name.endswith((_SCALE_WEIGHT_SUFFIX, _SCALE_INPUT_SUFFIX)):
                    mapping[name] = key
        if "shared.weight" not in mapping and _TIED_EMBEDDING in mapping:
            mapping["shared.weight"] = mapping[_TIED_EMBEDDING]
        mapping.pop(_TIED_EMBEDDING, None)  # re-tied to shared.weight after loading
    elif _WAN_PROBE in keyset and "token_embedding.weight" in keyset:
        mapping = {}
        for key in keys:
            name = wan_t5_key_to_transformers(key)
            if name is None:
                raise SamaModelFileError(
                    f"{path} looks like Wan's T5 encoder but has an unexpected key {key!r}; "
                    "it may be a different T5 variant. Use models_t5_umt5-xxl-enc-bf16.pth."
                )
            mapping[name] = key
    else:
        raise _wrong_kind_error(path, keys)

    relative_bias = [name for name in mapping if name.endswith("relative_attention_bias.weight")]
    layers = {int(_HF_BLOCK.match(name).group(1)) for name in mapping if _HF_BLOCK.match(name)}
    if "shared.weight" not in mapping or len(relative_bias) != len(layers):
        raise _wrong_kind_error(path, keys)
    return mapping


def infer_umt5_config(shapes: Mapping[str, Sequence[int]]):
    """A ``UMT5Config`` from the tensor shapes of an encoder state dict in transformers' names.

    vocab and d_model from the embedding; d_ff from the first feed-forward; layers by counting
    blocks; heads and buckets from the (per-layer) relative attention bias (buckets, heads);
    d_kv = query width / heads. The max distance (128) and LayerNorm eps (1e-6) are not stored in
    any file and are UMT5's values.
    """
    from transformers import UMT5Config

    vocab_size, d_model = shapes["shared.weight"]
    num_layers = len({int(m.group(1)) for m in map(_HF_BLOCK.match, shapes) if m})
    num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner_dim = shapes[_HF_PROBE][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=RELATIVE_ATTENTION_MAX_DISTANCE,
        feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )


def _load_weight(reader: _CheckpointReader, key: str, dtype: torch.dtype, device) -> torch.Tensor:
    """One tensor in the compute dtype; fp8 weights dequantised with their ComfyUI scale."""
    tensor = reader.tensor(key)
    if tensor.dtype in _FLOAT8_DTYPES:
        tensor = tensor.to(torch.float32)
        scale_key = key[: -len(".weight")] + _SCALE_WEIGHT_SUFFIX if key.endswith(".weight") else None
        if scale_key is not None and scale_key in reader:
            # ComfyUI's scaled fp8 stores weight / scale_weight; the real weight is the product.
            tensor = tensor * reader.tensor(scale_key).to(torch.float32)
    return tensor.to(device=device, dtype=dtype)


def build_umt5_encoder(config, state_dict: Mapping[str, torch.Tensor]):
    """``UMT5EncoderModel`` built on the meta device and filled in place (no second copy).

    ``state_dict`` is in transformers' names without ``encoder.embed_tokens.weight`` (it is tied to
    ``shared.weight``). Parameters take the dtype and device of the given tensors.
    """
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    try:
        result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    except RuntimeError as error:  # size mismatches: the inferred config does not fit the tensors
        raise SamaModelFileError(f"UMT5 weights do not fit the UMT5 config: {error}") from None
    model.tie_weights()
    missing = [key for key in result.missing_keys if key != _TIED_EMBEDDING]
    if missing or result.unexpected_keys:
        raise SamaModelFileError(
            f"UMT5 weights are incomplete: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
        )
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise SamaModelFileError(f"UMT5 weights left uninitialised: {still_meta[:5]}.")
    return model.eval().requires_grad_(False)


def load_umt5_encoder(
    weight_files: Sequence[pathlib.Path],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config=None,
):
    """(UMT5EncoderModel, embedded sentencepiece bytes or None) from weight files of any layout."""
    paths = [pathlib.Path(p) for p in weight_files]
    reader = _CheckpointReader(paths)
    keys = reader.keys()
    mapping = _map_keys_to_transformers(paths[0], keys)
    if config is None:
        config = infer_umt5_config({name: reader.shape(key) for name, key in mapping.items()})
    # fp16 overflows in the last feed-forward projection of T5-family models; transformers keeps
    # those weights (``_keep_in_fp32_modules``) in fp32 and its forward casts to them. Do the same.
    from transformers import UMT5EncoderModel

    keep_fp32 = tuple(UMT5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()

    state_dict = {}
    for name, key in mapping.items():
        name_dtype = torch.float32 if any(f".{part}." in f".{name}" for part in keep_fp32) else dtype
        state_dict[name] = _load_weight(reader, key, name_dtype, device)
    model = build_umt5_encoder(config, state_dict)
    del state_dict

    spiece = None
    if _SPIECE_KEY in keys:
        spiece = reader.tensor(_SPIECE_KEY).to(torch.uint8).numpy().tobytes()
    logger.info(
        "Loaded UMT5 encoder from %s: %d layers, d_model %d, %d heads, vocab %d, %s on %s",
        paths[0], config.num_layers, config.d_model, config.num_heads, config.vocab_size, dtype, device,
    )
    return model, spiece


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

@dataclass
class UMT5Tokenizer:
    """Text -> UMT5 token ids (content only; EOS is added by the encoder).

    Two sources, both the field's libraries: a sentencepiece model (bytes embedded in ComfyUI's file
    or a ``spiece.model``), run by ``sentencepiece`` exactly as ComfyUI does; or a transformers
    tokenizer folder (``tokenizer.json``), as Wan's reference code does.
    """

    encode_fn: Callable[[str], list[int]]
    eos_id: int
    pad_id: int
    vocab_size: int
    source: str

    def __call__(self, text: str) -> list[int]:
        return list(self.encode_fn(text))

    @classmethod
    def from_sentencepiece(cls, model_proto: bytes, source: str) -> "UMT5Tokenizer":
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except Exception as error:
            raise SamaModelFileError(f"Tokenizer {source} is not a sentencepiece model ({error}).") from None
        eos_id = processor.eos_id() if processor.eos_id() >= 0 else 1
        pad_id = processor.pad_id() if processor.pad_id() >= 0 else 0
        return cls(processor.encode, eos_id, pad_id, processor.get_piece_size(), source)

    @classmethod
    def from_transformers(cls, folder: pathlib.Path) -> "UMT5Tokenizer":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:
            raise SamaModelFileError(f"Could not load the tokenizer in {folder}: {error}") from None
        if tokenizer.eos_token_id is None:
            raise SamaModelFileError(
                f"The tokenizer in {folder} has no end-of-sequence token; it is not a UMT5 tokenizer."
            )

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(encode, tokenizer.eos_token_id, pad_id, len(tokenizer), str(folder))

    @classmethod
    def from_path(cls, path: str | pathlib.Path) -> "UMT5Tokenizer":
        """From a folder (tokenizer.json / tokenizer_config.json, else spiece.model) or a .model file."""
        path = pathlib.Path(path)
        if not path.exists():
            raise SamaFileNotFoundError(
                f"Tokenizer path {path} does not exist. Give the folder of google/umt5-xxl's tokenizer "
                "files (tokenizer.json or spiece.model) or a spiece.model file."
            )
        if path.is_file():
            if path.name == "tokenizer.json" or path.name == "tokenizer_config.json":
                return cls.from_transformers(path.parent)
            return cls.from_sentencepiece(path.read_bytes(), str(path))
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return cls.from_transformers(path)
        if (path / "spiece.model").exists():
            return cls.from_sentencepiece((path / "spiece.model").read_bytes(), str(path / "spiece.model"))
        raise SamaModelFileError(
            f"No tokenizer files in {path}: expected tokenizer.json or spiece.model (google/umt5-xxl)."
        )


# ----------------------------------------------------------------------------------------------
# Finding the files of each layout
# ----------------------------------------------------------------------------------------------

@dataclass
class _Sources:
    weight_files: list[pathlib.Path]
    config_file: pathlib.Path | None  # Hugging Face config.json, when the layout has one
    tokenizer_path: pathlib.Path | None  # found beside the weights, when the layout has one


def _hf_weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    singles = sorted(folder.glob("*.safetensors"))
    return singles[:1] if len(singles) == 1 else []


def _first_existing(*candidates: pathlib.Path) -> pathlib.Path | None:
    return next((c for c in candidates if c.exists()), None)


def _has_tokenizer_files(folder: pathlib.Path) -> bool:
    return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "spiece.model"))


def _find_sources(path: pathlib.Path) -> _Sources:
    if not path.exists():
        raise SamaFileNotFoundError(
            f"Text encoder path {path} does not exist. Give ComfyUI's umt5_xxl_*.safetensors, Wan's "
            "models_t5_umt5-xxl-enc-bf16.pth, or a Hugging Face umt5-xxl folder."
        )
    if path.is_file():
        # Wan's model folder keeps the tokenizer in google/umt5-xxl beside the .pth.
        beside = path.parent / "google" / "umt5-xxl"
        return _Sources([path], None, beside if beside.is_dir() else None)

    if (path / "model_index.json").exists() and (path / "text_encoder").is_dir():  # diffusers pipeline
        return _find_sources(path / "text_encoder")
    if (path / "config.json").exists():
        files = _hf_weight_files(path)
        if not files:
            raise SamaModelFileError(
                f"{path} has a config.json but no weights (model.safetensors, shards with "
                "model.safetensors.index.json, or pytorch_model.bin)."
            )
        tokenizer = path if _has_tokenizer_files(path) else _first_existing(path.parent / "tokenizer")
        return _Sources(files, path / "config.json", tokenizer)
    wan_files = sorted(path.glob("models_t5_*.pth"))
    if wan_files:  # a Wan2.1 model folder
        tokenizer = path / "google" / "umt5-xxl"
        return _Sources(wan_files[:1], None, tokenizer if tokenizer.is_dir() else None)
    raise SamaModelFileError(
        f"{path} is a folder without a text encoder: expected config.json + weights (Hugging Face), "
        "text_encoder/ (diffusers) or models_t5_umt5-xxl-enc-bf16.pth (Wan)."
    )


def _read_config(config_file: pathlib.Path):
    from transformers import UMT5Config

    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "umt5":
        raise SamaModelFileError(
            f"{config_file} describes a {raw.get('model_type', 'unknown')!r} model, not 'umt5'. "
            "SAMA needs the UMT5-XXL text encoder (google/umt5-xxl)."
        )
    return UMT5Config.from_pretrained(str(config_file.parent), local_files_only=True)


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------

class TextEncoder:
    """UMT5 prompt encoder with SAMA's conventions and a small cache of recent prompts.

    ``encode(prompts)`` -> (B, text_len, d_model): real token rows, then zeros (per sample).
    ``encode_edit(instruction, negative)`` -> (cond, uncond), each (1, text_len, d_model), with the
    "[Video edit] " prefix and the "[Video edit]" default negative applied (prompts.py).
    Outputs are in the model's compute dtype, on its device.
    """

    def __init__(self, model, tokenizer: UMT5Tokenizer, text_len: int = TEXT_LEN, cache_size: int = 16):
        if text_len < 1:
            raise SamaInputError(f"text_len must be at least 1, got {text_len}.")
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise SamaModelFileError(
                f"Tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the text encoder "
                f"embeds only {vocab}: they do not belong together. Use the umt5-xxl tokenizer with the "
                "UMT5 encoder."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()

    @classmethod
    def from_path(
        cls,
        path: str | pathlib.Path,
        tokenizer_path: str | pathlib.Path | None = None,
        dtype: str | torch.dtype = "bf16",
        device: str | torch.device = "cpu",
        text_len: int = TEXT_LEN,
        cache_size: int = 16,
    ) -> "TextEncoder":
        """Load from a file or folder of any supported layout (see the module docstring).

        The tokenizer is taken from ``tokenizer_path`` when given, else from the file's embedded
        ``spiece_model``, else from tokenizer files beside the weights.
        """
        dtype = resolve_dtype(dtype)
        sources = _find_sources(pathlib.Path(path))
        config = _read_config(sources.config_file) if sources.config_file else None
        model, embedded_spiece = load_umt5_encoder(
            sources.weight_files, dtype=dtype, device=device, config=config
        )
        if tokenizer_path is not None:
            tokenizer = UMT5Tokenizer.from_path(tokenizer_path)
        elif embedded_spiece is not None:
            tokenizer = UMT5Tokenizer.from_sentencepiece(embedded_spiece, f"{path} (embedded spiece_model)")
        elif sources.tokenizer_path is not None:
            tokenizer = UMT5Tokenizer.from_path(sources.tokenizer_path)
        else:
            raise SamaInputError(
                f"Text encoder {path} has no tokenizer inside it. Pass tokenizer_path: a folder with "
                "google/umt5-xxl's tokenizer.json or spiece.model (Wan's model folder has it in "
                "google/umt5-xxl)."
            )
        return cls(model, tokenizer, text_len=text_len, cache_size=cache_size)

    # -- properties -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    # -- tokens -----------------------------------------------------------------------------

    def token_ids(self, cleaned_prompt: str) -> list[int]:
        """Content ids truncated to text_len - 1, then EOS: the real tokens of one cleaned prompt."""
        ids = self.tokenizer(cleaned_prompt)[: self.text_len - 1]
        return ids + [self.tokenizer.eos_id]

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each (B, text_len) long, padded like the reference (pad id, mask 0)."""
        rows = [self.token_ids(clean_prompt(p)) for p in _as_prompt_list(prompts)]
        return self._pad_tokens(rows, self.text_len)

    def _pad_tokens(self, rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """(B, text_len, d_model) embeddings of the prompts (cleaned here), zeros after each real length."""
        return self._encode_cleaned([clean_prompt(p) for p in _as_prompt_list(prompts)])

    def encode_edit(
        self, instruction: str, negative: str | None = None, prefix: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond), each (1, text_len, d_model), with SAMA's prompt conventions (prompts.py)."""
        both = self._encode_cleaned([edit_prompt(instruction, prefix), negative_prompt(negative, prefix)])
        return both[0:1], both[1:2]

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def _encode_cleaned(self, cleaned: list[str]) -> torch.Tensor:
        keys = [(text, self.text_len, self.dtype, str(self.device)) for text in cleaned]
        todo = list(dict.fromkeys(key for key in keys if key not in self._cache))
        fresh = dict(zip(todo, self._run_encoder([key[0] for key in todo]))) if todo else {}
        for key in keys:
            if key in self._cache:
                self._cache.move_to_end(key)
        out = torch.zeros(len(cleaned), self.text_len, self.hidden_size, dtype=self.dtype, device=self.device)
        for i, key in enumerate(keys):
            rows = fresh[key] if key in fresh else self._cache[key]  # (L_i, dim)
            out[i, : rows.shape[0]] = rows
        for key, rows in fresh.items():
            self._remember(key, rows)
        return out  # (B, text_len, dim)

    def _run_encoder(self, cleaned: list[str]) -> list[torch.Tensor]:
        """Real-token rows (L_i, dim) of each prompt, from one batched forward pass.

        The batch is padded only to its longest prompt, not to text_len: padded keys are masked out
        of attention (their softmax weight is exactly zero) and UMT5's position bias depends only on
        relative positions, so the real rows equal those of a 512-long run (to float rounding);
        the rows after the real length are zeros either way.
        """
        rows = [self.token_ids(text) for text in cleaned]
        lengths = [len(r) for r in rows]
        ids, mask = self._pad_tokens(rows, max(lengths))  # (B, L), (B, L)
        hidden = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state  # (B, L, dim)
        return [hidden[i, :length].clone() for i, length in enumerate(lengths)]

    def _remember(self, key: tuple, rows: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = rows
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def _as_prompt_list(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SamaInputError("No prompts given to encode: pass a list with at least one prompt.")
    return prompts


def load_text_encoder(
    path: str | pathlib.Path,
    tokenizer_path: str | pathlib.Path | None = None,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    text_len: int = TEXT_LEN,
    cache_size: int = 16,
) -> TextEncoder:
    """Shorthand for ``TextEncoder.from_path``."""
    return TextEncoder.from_path(path, tokenizer_path, dtype=dtype, device=device, text_len=text_len,
                                 cache_size=cache_size)
