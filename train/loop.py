"""The SAMA training loop on accelerate (one CPU, one GPU, or many with DDP / FSDP / DeepSpeed).

Reads top to bottom: accelerator -> data -> model (+ LoRA) -> optimizer -> EMA -> resume -> loop
(accumulate micro-batches, step, EMA, log, checkpoint, validate) -> export. Stage 0 and stage 1 are
the same loop on different data (SAMA_REFERENCE.md section 7); stage 1 starts from stage 0's export
through `model.init_from`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from sama_core.errors import SamaInputError

from . import checkpoint as ckpt
from .cache import CachedFeatureDataset, cache_fingerprint, collate_features
from .config import TrainConfig, learning_rate_at, save_config
from .data import (RAW_VIDEO, VIDEO_EDIT, IMAGE_EDIT, BucketBatchPlan, ProcessBatchSampler, RawMediaDataset,
                   collate_raw, load_or_build_index, pretext_names_in)
from .ema import EMA
from .features import DTYPES, FeatureEncoders, batch_to, copy_source_where_dropped, drop_prompts, negative_rows
from .losses import training_loss
from .modeling import build_dit

log = logging.getLogger(__name__)

STAGE_KINDS = {"stage0": {IMAGE_EDIT, RAW_VIDEO}, "stage1": {VIDEO_EDIT, IMAGE_EDIT}}
FINAL_DIR = "final"
DIT_FILE = "sama_dit.safetensors"
LORA_FILE = "sama_lora.safetensors"
PARTS_FILE = "sama_parts.safetensors"


@dataclasses.dataclass
class TrainingData:
    dataset: torch.utils.data.Dataset
    collate: Callable
    plan: BucketBatchPlan
    encoders: Optional[FeatureEncoders]    # None when training from the feature cache
    skipped_at_index: int
    cached: Optional[CachedFeatureDataset] = None


@dataclasses.dataclass
class TrainResult:
    step: int
    output_dir: Path
    export: Optional[Path]
    history: list                          # the logged metric rows


# ------------------------------------------------------------------------------------------- set-up

def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    trackers = None
    if cfg.log.tensorboard:
        try:
            import tensorboard  # noqa: F401
            trackers = "tensorboard"
        except ImportError:
            log.info("tensorboard is not installed: metrics go to stdout and metrics.jsonl only")
    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, log_with=trackers,
                       project_config=ProjectConfiguration(project_dir=str(cfg.output_path),
                                                           logging_dir=str(cfg.output_path / "logs")))


def check_engine(cfg: TrainConfig, accelerator) -> None:
    """Combinations the loop does not support, refused before any weight is loaded."""
    from accelerate.utils import DistributedType
    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED and cfg.ema.enabled:
        raise SamaInputError("EMA is not supported under DeepSpeed ZeRO (the weights are partitioned away from the "
                             "EMA's copy): set ema.enabled=false, or use FSDP2 (train/accelerate/fsdp2.yaml)")
    if engine in (DistributedType.FSDP, DistributedType.DEEPSPEED) and cfg.lora.enabled:
        raise SamaInputError("LoRA runs are meant for plain data parallel (every GPU holds the frozen base): launch "
                             "with train/accelerate/ddp.yaml or a single process, not FSDP / DeepSpeed")


def check_stage_data(cfg: TrainConfig, kinds: set) -> None:
    if cfg.stage is None:
        return
    odd = kinds - STAGE_KINDS[cfg.stage]
    if odd:
        log.warning("%s normally trains on %s; these manifests also hold %s", cfg.stage,
                    sorted(STAGE_KINDS[cfg.stage]), sorted(odd))
    if cfg.stage == "stage1" and cfg.model.init_from is None:
        log.warning("stage1 without model.init_from: stage 1 normally starts from stage 0's export "
                    "(output_dir/final/%s)", DIT_FILE)


def check_keep_masks(cfg: TrainConfig, any_keep: bool) -> None:
    if cfg.train.keep_region_weight > 0 and not any_keep:
        log.warning("train.keep_region_weight is %g but no sample has a keep mask (\"keep_mask\" on the manifest "
                    "rows; a cache built before they were added has none): the weight has no effect",
                    cfg.train.keep_region_weight)


def build_training_data(cfg: TrainConfig, accelerator) -> TrainingData:
    parts = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    pretext_names_in(cfg.data.pretext_mix)  # validates the names
    if cfg.data.cache_dir:
        dataset = CachedFeatureDataset(cfg.resolve_path(cfg.data.cache_dir), cache_fingerprint(cfg),
                                       cfg.data.semantic_anchoring)
        check_stage_data(cfg, {s["kind"] for s in dataset.samples})
        check_keep_masks(cfg, any(s.get("keep", False) for s in dataset.samples))
        plan = BucketBatchPlan(dataset.bucket_members(), parts, cfg.seed, cfg.data.pretext_mix)
        return TrainingData(dataset, collate_features, plan, None, len(dataset.skipped), cached=dataset)
    index_path = cfg.output_path / "data_index.json"
    if accelerator.is_main_process:
        index = load_or_build_index(cfg, index_path)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        index = load_or_build_index(cfg, index_path)
    check_stage_data(cfg, {s.row.kind for s in index.samples})
    check_keep_masks(cfg, any(s.row.keep is not None for s in index.samples))
    dataset = RawMediaDataset(index, cfg.data)
    plan = BucketBatchPlan(index.buckets(), parts, cfg.seed, cfg.data.pretext_mix)
    encoders = FeatureEncoders.from_config(cfg, device=accelerator.device)
    return TrainingData(dataset, collate_raw, plan, encoders, len(index.skipped))


def make_loader(cfg: TrainConfig, data: TrainingData, accelerator, start_batch: int):
    sampler = ProcessBatchSampler(data.plan, accelerator.num_processes, accelerator.process_index,
                                  cfg.train.gradient_accumulation_steps, start_batch)
    return torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=data.collate,
                                       num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())


def trainable_setup(cfg: TrainConfig, model, fresh_modules: list) -> list[str]:
    """Which weights train: everything (full fine-tune) or LoRA adapters (+ full modules). Returns the
    modules trained in full next to a LoRA."""
    full_modules = []
    if cfg.lora.enabled:
        from .lora import apply_lora
        full_modules = list(cfg.lora.full_modules) or list(fresh_modules)
        apply_lora(model, cfg.lora, full_modules)
    elif fresh_modules:
        log.info("full fine-tune; fresh SAMA parts %s train with the rest", fresh_modules)
    if not cfg.data.semantic_anchoring:
        # Without anchors the semantic MLP/head get no gradient; frozen so DDP does not wait for them.
        for name in ("siglip_feat_mlp", "semantic_head"):
            model.get_submodule(name).requires_grad_(False)
    return full_modules


def run_fingerprint(cfg: TrainConfig) -> str:
    """Settings a resumed run should share with its checkpoint (steps, lr and logging may change)."""
    return cfg.fingerprint("model", "data", "sigma", "lora", "seed")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to optim.lr, constant, then optim.final_lr from optim.decay_from_step on (config.py)."""
    return learning_rate_at(cfg.optim, step)


# ------------------------------------------------------------------------------------ one optimizer step

def tokens_of(batch: dict, patch=(1, 2, 2)) -> int:
    """DiT tokens of a feature batch: target + source patches + semantic tokens, summed over samples."""
    b, _, t, h, w = batch["target"].shape
    per_video = (t // patch[0]) * (h // patch[1]) * (w // patch[2])
    sem = batch["semantic"].shape[1] if batch.get("semantic") is not None else 0
    return b * (per_video * (2 if batch.get("source") is not None else 1) + sem)


def optimizer_step(accelerator, model, optimizer, micro_batches, cfg: TrainConfig, to_features: Callable,
                   trainable: list, patch=(1, 2, 2)) -> dict:
    """Accumulate gradients over the micro-batches and step once. Returns summed (detached) metrics."""
    totals = {"samples": 0, "tokens": 0, "skipped": 0}
    sums = None
    for raw in micro_batches:
        batch = to_features(raw)
        with accelerator.accumulate(model):
            parts, _ = training_loss(model, batch, cfg.sigma, cfg.train.semantic_loss_weight,
                                     edit_weight=cfg.train.edit_region_weight,
                                     edit_threshold=cfg.train.edit_region_threshold,
                                     keep_weight=cfg.train.keep_region_weight)
            accelerator.backward(parts.loss)
            if accelerator.sync_gradients and cfg.train.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        detached = torch.stack([parts.loss.detach(), parts.video.detach(), parts.semantic.detach()])
        sums = detached if sums is None else sums + detached
        totals["samples"] += batch["target"].shape[0]
        totals["tokens"] += tokens_of(batch, patch)
        totals["skipped"] += len(raw.get("skipped", []))
    totals["loss_sums"] = sums / len(micro_batches)  # (3,) means over the micro-batches: loss, video, semantic
    return totals


# ---------------------------------------------------------------------------------------------- logging

class MetricLog:
    """Averages step metrics between log points; writes stdout (main process), metrics.jsonl, trackers."""

    def __init__(self, accelerator, path: Path, skipped_at_index: int):
        self.accelerator, self.path = accelerator, path
        self.skipped_at_index = skipped_at_index
        self.history: list = []
        self._reset()

    def _reset(self):
        self.loss_sum, self.steps, self.samples, self.tokens, self.skipped = None, 0, 0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict):
        self.loss_sum = metrics["loss_sums"] if self.loss_sum is None else self.loss_sum + metrics["loss_sums"]
        self.steps += 1
        self.samples += metrics["samples"]
        self.tokens += metrics["tokens"]
        self.skipped += metrics["skipped"]

    def flush(self, step: int, lr: float, total_skipped: int) -> Optional[dict]:
        if self.steps == 0:
            return None
        acc = self.accelerator
        losses = acc.reduce(self.loss_sum / self.steps, reduction="mean").tolist()
        counts = acc.reduce(torch.tensor([self.samples, self.tokens, self.skipped], device=acc.device,
                                         dtype=torch.float64), reduction="sum").tolist()
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        row = {"step": step, "loss": losses[0], "loss_video": losses[1], "loss_semantic": losses[2], "lr": lr,
               "samples_per_s": counts[0] / elapsed, "tokens_per_s": counts[1] / elapsed,
               "skipped": int(total_skipped + counts[2]), "skipped_at_index": self.skipped_at_index}
        self._reset()
        if acc.is_main_process:
            self.history.append(row)
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("step %d  loss %.5f (video %.5f, semantic %.5f)  lr %.3g  %.2f samples/s  skipped %d",
                     step, row["loss"], row["loss_video"], row["loss_semantic"], lr, row["samples_per_s"],
                     row["skipped"])
        acc.log({k: v for k, v in row.items() if k != "step"}, step=step)
        return row


# ----------------------------------------------------------------------------------------------- export

def export_final(accelerator, model, ema, cfg: TrainConfig, step: int, full_modules: list) -> Optional[Path]:
    """output_dir/final/: the (EMA) DiT as one safetensors file that `load_dit` loads, or for LoRA runs the
    adapter file (+ the modules trained in full, layered on the base with load_dit([base, parts]))."""
    from sama_core.loading import save_dit
    from .lora import base_state_dict, save_lora
    unwrapped = accelerator.unwrap_model(model)
    use_ema = ema is not None and cfg.export.use_ema
    dtype = DTYPES[cfg.export.dtype]
    final = cfg.output_path / FINAL_DIR
    tmp = cfg.output_path / f".tmp-{FINAL_DIR}"
    swap = ema.swapped_in(unwrapped.named_parameters) if use_ema else contextlib.nullcontext()
    with swap:
        state = accelerator.get_state_dict(model)  # gathers the full weights under FSDP / ZeRO-3
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            if cfg.lora.enabled:
                save_lora(unwrapped, tmp / LORA_FILE, dtype, {"step": step, "ema": use_ema, "rank": cfg.lora.rank,
                                                              "alpha": cfg.lora.alpha})
                if full_modules:
                    parts = {k: v for k, v in base_state_dict(unwrapped).items()
                             if k.startswith(tuple(m + "." for m in full_modules))}
                    save_dit({k: v.to(dtype) for k, v in parts.items()}, tmp / PARTS_FILE, unwrapped.config)
            else:
                sd = {k.replace(".base_layer.", "."): v.to("cpu", dtype) for k, v in state.items()}
                save_dit(sd, tmp / DIT_FILE, unwrapped.config)
            save_config(cfg, tmp / "config.yaml")
            (tmp / "export.json").write_text(json.dumps({"step": step, "ema": use_ema, "dtype": cfg.export.dtype,
                                                         "lora": cfg.lora.enabled}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            log.info("exported %s weights at step %d to %s", "EMA" if use_ema else "raw", step, final)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------- train

def train(cfg: TrainConfig, resume: Optional[str] = None, on_step: Optional[Callable[[int], None]] = None
          ) -> TrainResult:
    """Run (or continue) a training stage. `on_step(step)` is called after every optimizer step."""
    out_dir = cfg.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg)
    check_engine(cfg, accelerator)
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg.seed)  # only initialisations use the global RNG (LoRA A matrices)

    # ---- data: a deterministic plan of global batches; features from the cache or the encoders
    data = build_training_data(cfg, accelerator)

    # ---- model, trainable weights, optimizer
    built = build_dit(cfg)
    model = built.model
    full_modules = trainable_setup(cfg, model, built.fresh_modules)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SamaInputError("nothing to train: every weight is frozen (check lora.* and data.semantic_anchoring)")
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = None
    if cfg.ema.enabled:
        ema = EMA(unwrapped.named_parameters(), cfg.ema.decay, "cpu" if cfg.ema.device == "cpu" else None)
        ema.sharded = any(hasattr(p, "to_local") for p in unwrapped.parameters())
    log.info("DiT from %s: %.1fM parameters, %.1fM trainable; %d process(es) (%s), global batch %d",
             built.source, sum(p.numel() for p in unwrapped.parameters()) / 1e6,
             sum(p.numel() for p in trainable) / 1e6, accelerator.num_processes, accelerator.distributed_type,
             data.plan.global_batch)

    # ---- resume: weights, optimizer, EMA, step (= data position)
    step, skipped_before = 0, 0
    resume_from = ckpt.resolve_resume(out_dir, resume)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, ema)
        step, skipped_before = state["step"], state.get("skipped", 0)
        if state.get("config") not in (None, run_fingerprint(cfg)):
            log.warning("model / data / sigma / LoRA settings changed since %s was written; continuing with the "
                        "new ones", resume_from.name)
        if state.get("global_batch") not in (None, data.plan.global_batch):
            log.warning("the global batch changed since the checkpoint (%s -> %s): the data order differs from "
                        "an uninterrupted run", state.get("global_batch"), data.plan.global_batch)

    # ---- validation inputs (encoded once)
    from .validation import prepare_validation, run_validation
    val_vae = data.encoders.vae if data.encoders is not None else None
    if cfg.validation.every > 0 and val_vae is None and cfg.encoders.vae:
        val_vae = FeatureEncoders.from_config(cfg, accelerator.device, need_text=False, need_anchors=False).vae
    val_samples = prepare_validation(cfg, data.dataset, data.encoders, data.cached)

    negative = negative_rows(cfg, data.encoders, data.cached) if cfg.train.prompt_dropout > 0 else None

    def to_features(raw: dict) -> dict:
        features = data.encoders.encode_batch(raw) if data.encoders is not None else raw
        if negative is not None:
            features = dict(features, context=drop_prompts(features["context"], features["seeds"], negative,
                                                           cfg.train.prompt_dropout))
            if cfg.train.dropout_copies_source:
                features = copy_source_where_dropped(features, cfg.train.prompt_dropout)
        return batch_to(features, accelerator.device)

    metrics_path = out_dir / "logs" / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    meter = MetricLog(accelerator, metrics_path, data.skipped_at_index)
    if accelerator.log_with:  # every process calls it; accelerate writes from the main one
        accelerator.init_trackers(cfg.stage or "sama", config=_flat(cfg.to_dict()))
    loader = make_loader(cfg, data, accelerator, start_batch=step)
    batches = iter(loader)
    accum = cfg.train.gradient_accumulation_steps
    bar = _progress_bar(cfg, accelerator, step)
    skipped_total = skipped_before
    model.train()

    deadline = deadline_after(cfg.train.max_minutes)
    while step < cfg.train.max_steps:
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [next(batches) for _ in range(accum)]
        metrics = optimizer_step(accelerator, model, optimizer, micro_batches, cfg, to_features, trainable,
                                 unwrapped.config.patch_size)
        step += 1
        if ema is not None:
            ema.update(unwrapped.named_parameters())
        meter.add(metrics)
        if bar is not None:
            bar.update(1)
        out_of_time = time_is_up(accelerator, deadline)
        last = step == cfg.train.max_steps or out_of_time
        if step % cfg.log.every == 0 or last:
            row = meter.flush(step, lr, skipped_total)
            skipped_total = row["skipped"]
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if not math.isfinite(row["loss"]):
                raise SamaInputError(f"the loss became {row['loss']} at step {step}: lower optim.lr, check the data, "
                                     "or resume from an earlier checkpoint")
        if step % cfg.checkpoint.every == 0 or last:
            ckpt.save_checkpoint(accelerator, out_dir, step, ema,
                                 {"skipped": skipped_total, "global_batch": data.plan.global_batch,
                                  "config": run_fingerprint(cfg)}, cfg.checkpoint.keep)
        if cfg.validation.every > 0 and step % cfg.validation.every == 0:
            run_validation(cfg, accelerator, unwrapped, ema, val_samples, step, val_vae)
        if on_step is not None:
            on_step(step)
        if out_of_time:
            log.info("train.max_minutes (%s) spent at step %d of %d: checkpoint saved and exported; continue "
                     "with --resume latest", cfg.train.max_minutes, step, cfg.train.max_steps)
            break

    if bar is not None:
        bar.close()
    export = export_final(accelerator, model, ema, cfg, step, full_modules)
    accelerator.end_training()
    return TrainResult(step, out_dir, export, meter.history)


clock = time.monotonic  # the loop's wall clock (a test replaces it)


def deadline_after(minutes: Optional[float]) -> Optional[float]:
    """The clock reading at which a budget of `minutes` from now is spent (None: no budget)."""
    return clock() + 60.0 * minutes if minutes else None


def time_is_up(accelerator, deadline: Optional[float]) -> bool:
    """Whether the run's wall-clock budget (train.max_minutes) is spent. With several processes the main
    process decides for all of them, so that every process stops (and saves) at the same step."""
    if deadline is None:
        return False
    if accelerator.num_processes == 1:
        return clock() >= deadline
    from accelerate.utils import broadcast
    flag = torch.tensor([float(clock() >= deadline)], device=accelerator.device)
    return bool(broadcast(flag, from_process=0).item())


def _progress_bar(cfg: TrainConfig, accelerator, step: int):
    if not (cfg.log.progress_bar and accelerator.is_main_process):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.train.max_steps, initial=step, desc=cfg.stage or "train", unit="step", leave=False)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
