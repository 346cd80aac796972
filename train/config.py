"""Training configuration: nested dataclasses read from YAML, with `key.sub=value` overrides.

Every field has a default that matches the paper's recipe (SAMA_REFERENCE.md section 7) where the paper
states one: EMA 0.9998, semantic loss weight 0.1, one anchor frame, 480p buckets, the pretext mix
none : cube : speed : tube = 1 : 2 : 3 : 4. An unknown key is an error that names the closest known key,
so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from sama_core.errors import SamaFileNotFoundError, SamaInputError

STAGES = ("stage0", "stage1")
# The paper's 480p area; the released inference buckets use it too (sama_core.video.REFERENCE_BUCKET_AREA).
AREA_480P = 480 * 832
DEFAULT_LORA_TARGETS = r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)|blocks\.\d+\.ffn\.(0|2)"


@dataclasses.dataclass
class ModelConfig:
    # DiT weights to start from: one file / folder / index, or a list layered in order (Wan2.1 base shards
    # first, then a SAMA file). A base without the SAMA parts gets them freshly initialised. Stage 1 starts
    # from stage 0's export (output_dir/final/sama_dit.safetensors).
    init_from: Optional[Union[str, list]] = None
    # Without init_from: a random model from a preset ("14B", "1.3B", "tiny") or explicit SamaConfig fields.
    preset: Optional[str] = None
    config: Optional[dict] = None
    attention_backend: str = "auto"
    gradient_checkpointing: bool = True


@dataclasses.dataclass
class EncoderConfig:
    """Frozen encoders. Needed by `cache`, by training straight from raw data, and by validation decoding."""
    vae: Optional[str] = None
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None
    siglip: Optional[str] = None
    dtype: str = "bf16"             # fp32 | bf16 | fp16 (the VAE stays fp32 under fp16)
    siglip_layer_norm_eps: Optional[float] = None


@dataclasses.dataclass
class ManifestSpec:
    path: str
    kind: str = "auto"              # auto | video_edit | image_edit | raw_video
    repeat: int = 1                 # each row appears this many times per epoch (dataset weighting)


@dataclasses.dataclass
class DataConfig:
    manifests: list = dataclasses.field(default_factory=list)   # paths or {path, kind, repeat}
    # Train from precomputed features (`python -m train cache`) when set; else from the raw files with the
    # encoders loaded next to the DiT.
    cache_dir: Optional[str] = None
    cache_dtype: str = "bf16"       # storage dtype of cached latents / text rows / anchor tokens
    cache_shard_size: int = 64      # samples per safetensors shard
    # Clips per VAE call while caching (null: 8, measured on 2 CPU cores; train/cache.py encode_limits). On a
    # GPU give more (e.g. 64): the Wan VAE's time there is in its operator count, not its batch. The cache
    # decodes with data.num_workers loader processes.
    cache_encode_batch: Optional[int] = None
    bucket_area: int = AREA_480P
    bucket_multiple: int = 32
    buckets: Optional[list] = None  # explicit [[width, height], ...]; default: sama_core's area buckets
    frame_buckets: list = dataclasses.field(default_factory=lambda: [17, 33, 49, 81])
    frame_stride: int = 1
    clip_start: str = "first"       # first | random (random start frame, drawn from the sample's seed)
    resize_mode: str = "crop"       # crop | letterbox | stretch
    semantic_anchoring: bool = True
    num_anchors: int = 1            # N uniform anchor frames of the target (paper: 1)
    pretext_mix: dict = dataclasses.field(
        default_factory=lambda: {"none": 1.0, "cube": 2.0, "speed": 3.0, "tube": 4.0})
    edit_prefix: bool = True        # "[Video edit] " before edit instructions, as the released inference
    num_workers: int = 2
    probe_workers: int = 8          # threads that read video headers while indexing
    max_replacements: int = 8       # a sample that fails to decode is replaced by another of its bucket


@dataclasses.dataclass
class SigmaConfig:
    sampling: str = "shift"         # shift: t ~ U(0, 1) then shifted | logit_normal: t = sigmoid(N(m, s))
    shift: float = 5.0              # applied to both samplings (1.0 = no shift)
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclasses.dataclass
class TrainingConfig:
    batch_size: int = 1             # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    mixed_precision: str = "bf16"   # no | bf16 | fp16 (accelerate autocast; master weights stay fp32)
    semantic_loss_weight: float = 0.1
    # Extra video-loss weight where the clean target and source latents differ (losses.py; 0 = the paper's
    # plain loss). Threshold: the channel-mean |target - source| that gets the full extra weight.
    edit_region_weight: float = 0.0
    edit_region_threshold: float = 0.25
    # Extra video-loss weight on the rows' keep masks ("keep_mask" in the manifest: what the edit must leave
    # alone, e.g. the objects the instruction does not name; losses.py). 0 = off; rows without a mask: none.
    keep_region_weight: float = 0.0
    # Probability that a sample's prompt is replaced by the negative prompt ("[Video edit]"), so that the
    # model also learns the unconditional prediction classifier-free guidance needs (0 = off).
    prompt_dropout: float = 0.0
    # With prompt dropout: a dropped sample's target becomes its source (features.copy_source_where_dropped),
    # so the unconditional prediction is "keep the source" (not in the paper; False = the paper's dropout).
    dropout_copies_source: bool = False
    # Wall-clock budget of this invocation in minutes (None = none): when it is spent, the run saves a
    # checkpoint and exports as if max_steps were reached; `--resume latest` continues it later. For rented
    # or shared GPUs whose time is fixed in advance.
    max_minutes: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    # A step decay: from `decay_from_step` on, the learning rate is `final_lr` (both or neither), as in the
    # VAE trainer. Resuming with it set is how a run that plateaued at optim.lr is finished.
    decay_from_step: Optional[int] = None
    final_lr: Optional[float] = None


@dataclasses.dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9998
    device: str = "same"            # same (as the weights) | cpu (saves accelerator memory)


@dataclasses.dataclass
class LoRAConfig:
    enabled: bool = False
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    # A regex matched against full module names (peft full match) or a list of module-name suffixes.
    target_modules: Union[str, list] = DEFAULT_LORA_TARGETS
    # Modules trained in full next to the adapter. Empty = automatic: the SAMA parts when the initial
    # model had none (a Wan2.1 base), nothing otherwise.
    full_modules: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclasses.dataclass
class ValidationConfig:
    every: int = 0                  # 0 = off
    manifest: Optional[str] = None  # held-out rows (default: the first rows of the training index)
    num_samples: int = 1
    steps: int = 20
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0
    use_ema: bool = True


@dataclasses.dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True        # through accelerate's tracker when tensorboard is installed
    progress_bar: bool = True


@dataclasses.dataclass
class ExportConfig:
    use_ema: bool = True
    dtype: str = "bf16"             # dtype of the exported DiT / LoRA file


@dataclasses.dataclass
class TrainConfig:
    stage: Optional[str] = None     # stage0 | stage1 (the CLI command sets it)
    output_dir: str = "runs/sama"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    encoders: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sigma: SigmaConfig = dataclasses.field(default_factory=SigmaConfig)
    train: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    # Folder the config file was read from: relative paths in the config are resolved against it.
    base_dir: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_path(self, path):
        """A path from the config: absolute as given, relative ones against the config file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if p.is_absolute() or self.base_dir is None:
            return p
        return Path(self.base_dir) / p

    @property
    def output_path(self) -> Path:
        return self.resolve_path(self.output_dir)

    def manifest_specs(self) -> list[ManifestSpec]:
        specs = []
        for i, entry in enumerate(self.data.manifests):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or "path" not in entry:
                raise SamaInputError(f"data.manifests[{i}] must be a path or {{path: ..., kind: ..., repeat: ...}}, "
                                     f"got {entry!r}")
            spec = _build(ManifestSpec, entry, f"data.manifests[{i}]")
            spec.path = str(self.resolve_path(spec.path))
            specs.append(spec)
        return specs

    def fingerprint(self, *sections: str) -> str:
        """A short hash of some config sections (to tell whether a cache was built with these settings)."""
        d = self.to_dict()
        blob = json.dumps({s: _dig(d, s) for s in sections}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _dig(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


# ------------------------------------------------------------------------------------------- building

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls, values: dict, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SamaInputError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(types)}"
            raise SamaInputError(f"unknown config key '{where + '.' if where else ''}{key}'{hint}")
        tp = types[key]
        name = f"{where}.{key}" if where else key
        kwargs[key] = _build(tp, value, name) if _is_dataclass_type(tp) else _coerce(value, tp, name)
    return cls(**kwargs)


def _coerce(value, tp, name: str):
    """Numbers as the field declares them. YAML 1.1 reads `1e-5` (no dot) as a string, a classic trap."""
    args = typing.get_args(tp)
    wanted = tp if not args else next((a for a in args if a in (int, float)), None)
    if wanted is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise SamaInputError(f"config key '{name}' must be a number, got {value!r}") from None
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _set_dotted(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise SamaInputError(f"override '{dotted}': '{part}' is not a section")
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.max_steps=10` -> ("train.max_steps", 10); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise SamaInputError(f"override '{text}' must look like key.sub=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise SamaInputError(f"override '{text}' has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SamaInputError(f"override '{text}': the value is not valid YAML ({e})") from None
    return key, value


def build_config(cls, values: dict, overrides=(), base_dir=None):
    """A config dataclass (`cls`) from plain values + `key=value` overrides, not yet validated. Relative
    paths will resolve against base_dir (the config file's folder). Shared by train/ and train.vae_train."""
    values = json.loads(json.dumps(values or {}))  # a deep copy
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(values, key, value)
    if base_dir is not None and "base_dir" not in values:
        values["base_dir"] = str(base_dir)
    return _build(cls, values, "")


def read_config_file(path, example: str = "train/configs/") -> tuple[dict, Path]:
    """(the YAML mapping of a config file, its folder); one clear error for a missing, non-UTF-8, invalid or
    non-mapping file."""
    path = Path(path)
    if not path.exists():
        raise SamaFileNotFoundError(f"config file not found: {path} (see {example} for examples)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:  # found by fuzz/fuzz_inputs.py train_config
        raise SamaInputError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}): give the YAML "
                             f"training config, e.g. one of {example}") from None
    except yaml.YAMLError as e:
        raise SamaInputError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise SamaInputError(f"{path} holds a YAML {type(values).__name__}, not a mapping of settings: see "
                             f"{example} for the layout")
    return values, path.resolve().parent


def config_from_dict(values: dict, overrides: list[str] = (), base_dir=None) -> TrainConfig:
    cfg = build_config(TrainConfig, values, overrides, base_dir)
    validate(cfg)
    return cfg


def load_config(path, overrides: list[str] = ()) -> TrainConfig:
    values, folder = read_config_file(path)
    return config_from_dict(values, overrides, base_dir=folder)


def save_config(cfg: TrainConfig, path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------- validation

def learning_rate_at(optim, step: int) -> float:
    """The learning rate of `step` for an optim section with lr, warmup_steps, decay_from_step and final_lr
    (the DiT's OptimConfig, the VAE's VAEOptimConfig): linear warm-up to lr, constant, then final_lr from
    decay_from_step on. A pure function of the step, so there is nothing to checkpoint and a resumed run can
    add the step."""
    if optim.decay_from_step is not None and step >= optim.decay_from_step:
        return optim.final_lr
    warmup = optim.warmup_steps
    return optim.lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


def check_learning_rate_step(optim) -> None:
    """optim.decay_from_step and optim.final_lr: both or neither, final_lr > 0, decay_from_step >= 0."""
    if (optim.decay_from_step is None) != (optim.final_lr is None):
        raise SamaInputError("optim.decay_from_step and optim.final_lr go together: set both (e.g. "
                             "optim.decay_from_step=5000 optim.final_lr=1e-4) or neither")
    if optim.final_lr is not None and not (optim.final_lr > 0 and optim.decay_from_step >= 0):
        raise SamaInputError(f"optim.final_lr must be > 0 and optim.decay_from_step >= 0, got "
                             f"{optim.final_lr} and {optim.decay_from_step}")


def _choice(value, allowed, name):
    if value not in allowed:
        raise SamaInputError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    if cfg.stage is not None:
        _choice(cfg.stage, STAGES, "stage")
    _choice(cfg.train.mixed_precision, ("no", "bf16", "fp16"), "train.mixed_precision")
    _choice(cfg.sigma.sampling, ("shift", "logit_normal"), "sigma.sampling")
    _choice(cfg.data.clip_start, ("first", "random"), "data.clip_start")
    _choice(cfg.data.resize_mode, ("crop", "letterbox", "stretch"), "data.resize_mode")
    _choice(cfg.ema.device, ("same", "cpu"), "ema.device")
    for name in ("encoders.dtype", "export.dtype", "data.cache_dtype"):
        _choice(_dig(dataclasses.asdict(cfg), name), ("fp32", "bf16", "fp16"), name)
    positive = {"train.batch_size": cfg.train.batch_size,
                "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "train.max_steps": cfg.train.max_steps, "data.frame_stride": cfg.data.frame_stride,
                "data.num_anchors": cfg.data.num_anchors, "data.cache_shard_size": cfg.data.cache_shard_size,
                "checkpoint.keep": cfg.checkpoint.keep, "lora.rank": cfg.lora.rank,
                "data.bucket_multiple": cfg.data.bucket_multiple, "log.every": cfg.log.every}
    if cfg.data.cache_encode_batch is not None:
        positive["data.cache_encode_batch"] = cfg.data.cache_encode_batch
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SamaInputError(f"{name} must be a positive integer, got {value!r}")
    check_learning_rate_step(cfg.optim)
    if cfg.sigma.shift <= 0:
        raise SamaInputError(f"sigma.shift must be positive, got {cfg.sigma.shift} (1.0 = no shift)")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise SamaInputError(f"ema.decay must be in [0, 1), got {cfg.ema.decay} (the paper uses 0.9998)")
    if cfg.train.edit_region_weight < 0:
        raise SamaInputError(f"train.edit_region_weight must be >= 0, got {cfg.train.edit_region_weight} "
                             "(0 = the paper's plain loss)")
    if cfg.train.keep_region_weight < 0:
        raise SamaInputError(f"train.keep_region_weight must be >= 0, got {cfg.train.keep_region_weight} "
                             "(0 = off)")
    if cfg.train.edit_region_threshold <= 0:
        raise SamaInputError(f"train.edit_region_threshold must be positive, got {cfg.train.edit_region_threshold}")
    if cfg.train.max_minutes is not None and not cfg.train.max_minutes > 0:
        raise SamaInputError(f"train.max_minutes must be > 0 (or null for no time limit), got "
                             f"{cfg.train.max_minutes}")
    if not 0.0 <= cfg.train.prompt_dropout <= 1.0:
        raise SamaInputError(f"train.prompt_dropout must be in [0, 1], got {cfg.train.prompt_dropout} "
                             "(~0.1 is usual; 0 = off)")
    if cfg.train.dropout_copies_source and cfg.train.prompt_dropout <= 0:
        raise SamaInputError("train.dropout_copies_source acts on the samples prompt dropout drops: set "
                             "train.prompt_dropout > 0 too (e.g. 0.2), or turn it off")
    frames = cfg.data.frame_buckets
    if not frames or any(not isinstance(f, int) or f < 1 or (f - 1) % 4 for f in frames):
        raise SamaInputError(f"data.frame_buckets must be frame counts of the form 4k+1 (e.g. [17, 33, 49, 81]), "
                             f"got {frames!r}: the Wan VAE encodes 1 + 4k frames")
    if cfg.data.buckets is not None:
        for wh in cfg.data.buckets:
            if (not isinstance(wh, (list, tuple)) or len(wh) != 2
                    or any(not isinstance(v, int) or v < 16 or v % 16 for v in wh)):
                raise SamaInputError(f"data.buckets entries must be [width, height] multiples of 16, got {wh!r}")
    if cfg.model.init_from is None and cfg.model.preset is None and cfg.model.config is None:
        raise SamaInputError("model: give init_from (DiT weights to start from), or preset / config for a "
                             "randomly initialised model")
