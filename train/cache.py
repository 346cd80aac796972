"""The feature cache: VAE latents, text rows and SigLIP anchor tokens precomputed into safetensors shards,
so training holds only the DiT (and its optimizer) in memory.

Layout of `data.cache_dir`:
    data_index.json            the probed sample index (manifest rows, buckets)
    shard-00000.safetensors    samples [0, S), S = data.cache_shard_size; tensors named "<id>/<what>":
                                 <id>/target                  (16, T, h, w) target latents
                                 <id>/source                  (16, T, h, w) source latents (edits)
                                 <id>/source/<pretext>        perturbed-source latents (raw videos)
                                 <id>/text  or <id>/text/<pretext>   (L, text_dim) real token rows only
                                 <id>/semantic                (65 N, siglip_dim) anchor tokens
                                 <id>/keep                    (T, h, w) the row's keep mask on the latent
                                                              grid (edits with "keep_mask" only)
                               and in the metadata, "samples": JSON of each sample's kind, bucket, valid
                               latent frames and pretexts, and "skipped": the rows that failed to decode.
    extras.safetensors         the negative prompt's rows (for validation sampling)
    cache_index.json           written last: every cached sample, its shard and bucket; "fingerprint"
                               ties the cache to the settings that built it.

Resumable: a shard is written to a temporary name and renamed when complete, and existing shards are
skipped, so an interrupted `cache` run continues where it stopped. Under `accelerate launch`, shard k
is written by process k % num_processes.

Raw videos are cached with one fixed draw of every perturbing pretext in the mix (cube position, tube
permutation chosen once per sample, from the sample's seed); at training time the batch's pretext picks
which cached source (and task-token prompt) to use, and "none" uses no source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sama_core.errors import SamaInputError
from sama_core.pretext import NO_PRETEXT
from sama_core.prompts import negative_prompt

from .data import (LOAD_ERRORS, RAW_VIDEO, DataIndex, derive_seed, index_key, keep_masks, load_or_build_index,
                   make_source, pretext_names_in, prompt_for, RawMediaDataset)
from .features import DTYPES, FeatureEncoders, latent_frames_of, latent_grid_mask, pad_rows, valid_latent_frames

log = logging.getLogger(__name__)

CACHE_INDEX = "cache_index.json"
CACHE_VERSION = 2  # 2: the index says whether samples carry anchor tokens ("semantic")
# Clips per VAE call. Measured on 2 CPU cores (session 11, bench/cache_build.py, 60 SAMA-Shapes video edits of
# 17x64x64, the shipped VAE): 482 ms per sample at one clip per call, 288 at two, 230 at eight. Each sample
# used to be encoded on its own (the four later edits of a SAMA-Shapes clip, source remembered, one clip
# per call): 428 ms per sample, 1.85x the batched time, for the same tensors to 1e-5.
# Large clips gain nothing from batching and would not fit many at a time (one 81x480x832 clip is 32M voxels),
# so a call also holds at most ENCODE_VOXELS frame voxels (F x H x W), and at least one clip.
ENCODE_BATCH = 8
ENCODE_VOXELS = 8 * 17 * 64 * 64
# Samples decoded ahead of one round of VAE calls: at most ENCODE_CHUNK of them and CHUNK_BYTES of decoded
# frames (one 17x64x64 edit is ~1.7 MB; one 81x480x832 edit ~780 MB, so such samples go one at a time).
ENCODE_CHUNK = 32
CHUNK_BYTES = 256 * 2**20
LATENT_MEMO_SIZE = 64  # latents of recent distinct clips, kept across chunks
# Prompts per text-encoder call and anchor frames per SigLIP call: a chunk's prompts and anchors go through
# their encoders together (one call per sample cost 4.1 + 2.3 ms per sample on 2 CPU cores, session 18; on a
# GPU each call is a few ms of kernel launches whatever its size). Capped so that a big text encoder
# (UMT5-XXL, 512 tokens a prompt) holds a bounded batch.
TEXT_BATCH = 32
ANCHOR_BATCH = 64


@dataclasses.dataclass(frozen=True)
class EncodeLimits:
    """What one round of cache encoding holds: clips per VAE call (and frame voxels per call, so large clips
    go alone), and samples / decoded bytes per chunk."""
    clips_per_call: int
    voxels_per_call: int
    chunk_samples: int
    chunk_bytes: int

    @property
    def memo_size(self) -> int:
        return max(LATENT_MEMO_SIZE, 2 * self.chunk_samples)


def encode_limits(clips_per_call: Optional[int] = None) -> EncodeLimits:
    """The module's limits (measured on 2 CPU cores), or, for `data.cache_encode_batch`, that many 17x64x64
    clips per VAE call with the voxel and chunk limits scaled alike (never below the defaults). A GPU wants
    far more than 8: session 9 found the tiny Wan VAE's step bound by its operator count, not by the batch."""
    if clips_per_call is None:
        return EncodeLimits(ENCODE_BATCH, ENCODE_VOXELS, ENCODE_CHUNK, CHUNK_BYTES)
    if clips_per_call < 1:
        raise SamaInputError(f"data.cache_encode_batch is {clips_per_call}: give at least 1 clip per VAE call")
    scale = max(1.0, clips_per_call / ENCODE_BATCH)
    return EncodeLimits(clips_per_call, max(1, ENCODE_VOXELS * clips_per_call // ENCODE_BATCH),
                        int(ENCODE_CHUNK * scale), int(CHUNK_BYTES * scale))


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def cache_fingerprint(cfg) -> str:
    """Settings (and manifest contents) that change the cached features: a cache built with others is refused.

    Not data.semantic_anchoring: it adds the anchor tokens and changes nothing else, so a cache built with
    anchors also serves a run without them (the index says whether it has them; `CachedFeatureDataset`)."""
    settings = cfg.fingerprint("data.bucket_area", "data.bucket_multiple", "data.buckets", "data.frame_buckets",
                           "data.frame_stride", "data.clip_start", "data.resize_mode", "data.num_anchors",
                           "data.pretext_mix", "data.edit_prefix", "data.cache_dtype",
                           "data.manifests", "encoders", "seed")
    return hashlib.sha256((settings + index_key(cfg)).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- writing

def _frames_key(frames: torch.Tensor) -> str:
    """Identity of decoded frames (a digest of their bytes): equal frames encode to equal latents."""
    return hashlib.sha1(frames.contiguous().numpy().tobytes()).hexdigest() + str(tuple(frames.shape))


class LatentBatcher:
    """VAE latents of many clips at once: each distinct clip (by frame digest) is encoded once, up to
    `limits.clips_per_call` clips of one shape per VAE call (and `voxels_per_call` frame voxels), and the
    latents of the last `limits.memo_size` distinct clips are remembered (a clip with several edits, as
    SAMA-Shapes' five, has its source encoded once even when a chunk boundary falls between its edits)."""

    def __init__(self, encoders: FeatureEncoders, limits: Optional[EncodeLimits] = None):
        self.encoders, self.limits, self.memo = encoders, limits or encode_limits(), {}

    def encode(self, clips: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(3, F, H, W) in [-1, 1]] -> [(16, T, h, w)] normalised latents, in order (shared tensors for
        equal clips: clone before storing two of them)."""
        keys = [_frames_key(c) for c in clips]
        found = {k: self.memo[k] for k in keys if k in self.memo}
        pending: dict[str, torch.Tensor] = {}
        for key, clip in zip(keys, clips, strict=True):
            if key not in found:
                pending.setdefault(key, clip)
        by_shape: dict[tuple, list[str]] = {}
        for key, clip in pending.items():
            by_shape.setdefault(tuple(clip.shape), []).append(key)
        for shape, same_shape in by_shape.items():
            per_call = max(1, min(self.limits.clips_per_call,
                                  self.limits.voxels_per_call // math.prod(shape[1:])))
            for i in range(0, len(same_shape), per_call):
                part = same_shape[i:i + per_call]
                latents = self.encoders.latents(torch.stack([pending[k] for k in part]))
                found.update(zip(part, latents, strict=True))
        for key in keys:  # newest last; the oldest leave first
            self.memo.pop(key, None)
            self.memo[key] = found[key]
        while len(self.memo) > self.limits.memo_size:
            self.memo.pop(next(iter(self.memo)))
        return [found[k] for k in keys]


def decode_sample(dataset: RawMediaDataset, index: int, seed: int, pretexts: list[str]) -> dict:
    """Decode one sample and name the clips its cache entry needs encoded: "target", and "source" (edits)
    or "source/<pretext>" for each perturbing pretext of the mix (raw videos), each (3, F, H, W) in [-1, 1]."""
    sample = dataset.index.samples[index]
    raw = sample.row.kind == RAW_VIDEO
    loaded = dataset.load(index, NO_PRETEXT if raw else "-", seed)
    # The [0, 1] frames leave `loaded`: a chunk holds only the VAE inputs below (what CHUNK_BYTES counts).
    target = loaded.pop("target")  # (F, H, W, 3) in [0, 1]
    source = loaded.pop("source")
    frames = {"target": target}
    if raw:
        for p in pretexts:
            if p != NO_PRETEXT:
                frames[f"source/{p}"] = make_source(target, p,
                                                    torch.Generator().manual_seed(derive_seed(seed, "pretext", p)))
    else:
        frames["source"] = source
    clips = {name: f.permute(3, 0, 1, 2) * 2.0 - 1.0 for name, f in frames.items()}
    return {"index": index, "sample": sample, "raw": raw, "loaded": loaded, "clips": clips}


def _prompts_of(dataset: RawMediaDataset, decoded: dict, pretexts: list[str]) -> dict[str, str]:
    """The cached text rows a sample needs: "text/<pretext>" per pretext (raw videos) or "text" (edits)."""
    if decoded["raw"]:
        return {f"text/{p}": prompt_for(decoded["sample"], p, dataset.cfg.edit_prefix) for p in pretexts}
    return {"text": decoded["loaded"]["prompt"]}


def chunk_features(dataset: RawMediaDataset, encoders: FeatureEncoders, chunk: list[dict],
                   latents: list[dict], pretexts: list[str], store: torch.dtype) -> list[tuple[dict, dict]]:
    """Tensors ("<what>" names) and metadata of each decoded sample of a chunk, given its clips' latents.
    The chunk's prompts go through the text encoder TEXT_BATCH at a time and its anchor frames through SigLIP
    ANCHOR_BATCH at a time (frames of one shape per call), not one call per sample."""
    tensors = [{name: lat.clone() for name, lat in lat_of.items()} for lat_of in latents]  # one storage each
    wanted = [(i, name, prompt) for i, d in enumerate(chunk)
              for name, prompt in _prompts_of(dataset, d, pretexts).items()]
    for start in range(0, len(wanted), TEXT_BATCH):
        part = wanted[start:start + TEXT_BATCH]
        for (i, name, _), rows in zip(part, encoders.text_rows([p for _, _, p in part]), strict=True):
            tensors[i][name] = rows
    by_shape: dict[tuple, list[int]] = {}
    for i, d in enumerate(chunk):
        anchors = d["loaded"]["anchors"]
        if anchors is not None:
            by_shape.setdefault(tuple(anchors.shape), []).append(i)
    for shape, members in by_shape.items():
        per_call = max(1, ANCHOR_BATCH // shape[0])  # shape[0]: anchor frames per sample
        for start in range(0, len(members), per_call):
            part = members[start:start + per_call]
            stacked = torch.stack([chunk[i]["loaded"]["anchors"] for i in part])  # (B, N, H, W, 3)
            for i, tokens in zip(part, encoders.anchor_tokens(stacked), strict=True):
                tensors[i]["semantic"] = tokens
    out = []
    for d, parts in zip(chunk, tensors, strict=True):
        loaded = d["loaded"]
        if loaded.get("keep") is not None:
            parts["keep"] = latent_grid_mask(loaded["keep"][None], parts["target"].shape[1:])[0]
        parts = {k: v.detach().to("cpu", store).contiguous() for k, v in parts.items()}
        sample = d["sample"]
        valid = int(valid_latent_frames(torch.tensor([loaded["valid_frames"]]))[0])
        meta = {"kind": sample.row.kind, "bucket": sample.bucket.key, "valid_latent_frames": valid,
                "latent_frames": latent_frames_of(sample.bucket.frames), "where": sample.row.where,
                "pretexts": pretexts if d["raw"] else [], "keep": "keep" in parts}
        out.append((parts, meta))
    return out


def save_shard(path: Path, number: int, entries: list[tuple[int, dict, dict]], skipped: list[str]) -> None:
    """Write one shard atomically: entries are (sample id, {what: tensor}, metadata)."""
    tensors, samples = {}, []
    for sid, parts, meta in entries:
        samples.append({"id": sid, **meta})
        tensors.update({f"{sid}/{name}": t.contiguous() for name, t in parts.items()})
    if not tensors:  # safetensors needs at least one tensor; an all-failed shard still marks itself done
        tensors["empty"] = torch.zeros(1)
    _atomic_save(tensors, path, {"samples": json.dumps(samples), "skipped": json.dumps(skipped),
                                 "shard": str(number)})


class _DecodeJobs(torch.utils.data.Dataset):
    """decode_sample for a DataLoader: each item is a decoded sample, or {"index", "error"} when it failed
    (a worker must not raise: the failure is reported and the sample skipped, as in one process)."""

    def __init__(self, dataset: RawMediaDataset, indices: list[int], seed: int, pretexts: list[str]):
        self.dataset, self.indices, self.seed, self.pretexts = dataset, indices, seed, pretexts

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        try:
            return decode_sample(self.dataset, index, derive_seed(self.seed, "cache", index), self.pretexts)
        except LOAD_ERRORS as e:
            return {"index": index, "error": str(e)}


def _as_is(item):
    return item


def decoded_samples(dataset: RawMediaDataset, indices: list[int], seed: int, pretexts: list[str],
                    workers: int = 0):
    """The samples of `indices` decoded in order: in this process, or in `workers` loader processes (the
    frames are decoded on the CPU while this process encodes the previous chunk, e.g. on a GPU)."""
    jobs = _DecodeJobs(dataset, indices, seed, pretexts)
    if workers <= 0:
        yield from (jobs[i] for i in range(len(jobs)))
        return
    yield from torch.utils.data.DataLoader(jobs, batch_size=None, num_workers=workers, collate_fn=_as_is)


def write_shard(dataset, encoders, number: int, indices: list[int], path: Path, seed: int,
                pretexts: list[str], store: torch.dtype, limits: Optional[EncodeLimits] = None,
                workers: int = 0) -> dict:
    """Encode a shard's samples a chunk at a time (`limits`: samples and bytes of decoded frames per chunk):
    decode them (a sample that fails to decode is skipped and reported), encode all their clips in batched
    VAE calls, then their prompts and anchors in batched calls."""
    limits = limits or encode_limits()
    entries, skipped = [], []
    batcher = LatentBatcher(encoders, limits)

    def encode(chunk: list[dict]) -> None:
        names = [(d, name) for d in chunk for name in d["clips"]]
        latents = batcher.encode([d["clips"][name] for d, name in names])
        per_sample: dict[int, dict] = {}
        for (d, name), lat in zip(names, latents, strict=True):
            per_sample.setdefault(d["index"], {})[name] = lat
        features = chunk_features(dataset, encoders, chunk, [per_sample[d["index"]] for d in chunk], pretexts,
                                  store)
        entries.extend((d["index"], parts, meta) for d, (parts, meta) in zip(chunk, features, strict=True))

    chunk, held = [], 0
    for decoded in decoded_samples(dataset, indices, seed, pretexts, workers):
        if "error" in decoded:
            where = dataset.index.samples[decoded["index"]].row.where
            skipped.append(f"{where}: {decoded['error']}")
            log.warning("cache: skipped %s (%s)", where, decoded["error"])
            continue
        chunk.append(decoded)
        held += sum(c.numel() * c.element_size() for c in decoded["clips"].values())
        if len(chunk) >= limits.chunk_samples or held >= limits.chunk_bytes:
            encode(chunk)
            chunk, held = [], 0
    if chunk:
        encode(chunk)
    save_shard(path, number, entries, skipped)
    return {"samples": len(entries), "skipped": len(skipped)}


def write_feature_cache(cache_dir, samples: list[dict], fingerprint: str, negative: torch.Tensor,
                        shard_size: int = 64) -> Path:
    """A cache from features computed elsewhere (another encoder pipeline, or a test).

    samples: dicts with "kind" ("video_edit" | "image_edit" | "raw_video"), "bucket" (any string; samples of
    one bucket must share shapes), "target" (16, T, h, w), "source" (edits) or "source/<pretext>" (raw),
    "text" (edits) or "text/<pretext>" (raw, "none" included), optional "semantic" (N, width),
    optional "valid_latent_frames" (default T). negative: (L, text_dim) rows of the negative prompt.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for sid, s in enumerate(samples):
        parts = {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        frames = s["target"].shape[1]
        pretexts = sorted({k.split("/", 1)[1] for k in parts if k.startswith("text/")})
        meta = {"kind": s["kind"], "bucket": s["bucket"], "valid_latent_frames": int(s.get("valid_latent_frames", frames)),
                "latent_frames": frames, "where": s.get("where", f"sample {sid}"), "pretexts": pretexts,
                "keep": "keep" in parts}
        entries.append((sid, parts, meta))
    shards = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)]
    for n, chunk in enumerate(shards):
        save_shard(cache_dir / shard_name(n), n, chunk, [])
    _atomic_save({"negative": negative.contiguous()}, cache_dir / "extras.safetensors", {})
    semantic = bool(samples) and all("semantic" in s for s in samples)
    _write_cache_index(cache_dir, len(shards), fingerprint, {}, [], semantic)
    return cache_dir


def build_cache(cfg, accelerator=None, progress: bool = True) -> Path:
    """Run the whole cache step (this process's shards); the main process writes cache_index.json last."""
    if not cfg.data.cache_dir:
        raise SamaInputError("data.cache_dir is not set: say where the feature cache goes")
    cache_dir = cfg.resolve_path(cfg.data.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = accelerator.device if accelerator else torch.device("cpu")
    fingerprint = cache_fingerprint(cfg)
    _refuse_stale(cache_dir, fingerprint, cfg.data.semantic_anchoring)

    if rank == 0:
        index = load_or_build_index(cfg, cache_dir / "data_index.json")
    if accelerator:
        accelerator.wait_for_everyone()
    if rank != 0:
        index = load_or_build_index(cfg, cache_dir / "data_index.json")

    # Each distinct row is cached once, even when a manifest repeats it.
    unique = _unique_rows(index)
    size = cfg.data.cache_shard_size
    shards = [unique[i:i + size] for i in range(0, len(unique), size)]
    mine = [n for n in range(len(shards)) if n % world == rank]
    todo = [n for n in mine if not (cache_dir / shard_name(n)).exists()]
    log.info("cache: %d samples in %d shards; process %d writes %d (%d already done)",
             len(unique), len(shards), rank, len(todo), len(mine) - len(todo))
    if todo:
        encoders = FeatureEncoders.from_config(cfg, device=device)
        dataset = RawMediaDataset(index, cfg.data)
        pretexts = pretext_names_in(cfg.data.pretext_mix)
        store = DTYPES[cfg.data.cache_dtype]
        limits = encode_limits(cfg.data.cache_encode_batch)
        bar = _progress(len(todo), progress and rank == 0)
        for n in todo:
            stats = write_shard(dataset, encoders, n, shards[n], cache_dir / shard_name(n), cfg.seed, pretexts,
                                store, limits, cfg.data.num_workers)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stats)
        if bar is not None:
            bar.close()
        if rank == 0 and not (cache_dir / "extras.safetensors").exists():
            rows = encoders.text_rows([negative_prompt(None, cfg.data.edit_prefix)])[0]
            _atomic_save({"negative": rows.to("cpu", store).contiguous()}, cache_dir / "extras.safetensors", {})
    if accelerator:
        accelerator.wait_for_everyone()
    if rank == 0:
        _write_cache_index(cache_dir, len(shards), fingerprint, _repeats(index), list(index.skipped),
                           cfg.data.semantic_anchoring)
    if accelerator:
        accelerator.wait_for_everyone()
    return cache_dir


def _unique_rows(index: DataIndex) -> list[int]:
    seen, out = set(), []
    for i, s in enumerate(index.samples):
        key = (s.row.manifest, s.row.line)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def _refuse_stale(cache_dir: Path, fingerprint: str, semantic_anchoring: bool) -> None:
    index_file = cache_dir / CACHE_INDEX
    if index_file.exists():
        saved = json.loads(index_file.read_text())
        if saved.get("fingerprint") != fingerprint:
            raise SamaInputError(
                f"the cache in {cache_dir} was built with other data/encoder settings (fingerprint "
                f"{saved.get('fingerprint')} != {fingerprint}); use a new data.cache_dir, or delete the old one")
        _check_semantic(cache_dir, saved, semantic_anchoring)


def _check_semantic(cache_dir: Path, saved: dict, semantic_anchoring: bool) -> None:
    if semantic_anchoring and not saved.get("semantic", False):
        raise SamaInputError(
            f"the cache in {cache_dir} was built with data.semantic_anchoring=false (no anchor tokens), but this "
            "config trains with semantic anchoring: rebuild it into a new data.cache_dir, or set "
            "data.semantic_anchoring=false")


def _write_cache_index(cache_dir: Path, num_shards: int, fingerprint: str, repeats: dict, skipped: list,
                       semantic: bool) -> None:
    """skipped: (where, reason) of the rows the index could not probe; shards add their decode failures.
    semantic: whether every sample carries its anchor tokens."""
    samples, skipped = [], [f"{where}: {reason}" for where, reason in skipped]
    for n in range(num_shards):
        path = cache_dir / shard_name(n)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        for s in json.loads(meta["samples"]):
            samples.append({**s, "shard": path.name, "repeat": repeats.get(s["id"], 1)})
        skipped.extend(json.loads(meta["skipped"]))
    if not samples:
        raise SamaInputError(f"the cache in {cache_dir} holds no sample: every row failed ({skipped[:3]})")
    data = {"version": CACHE_VERSION, "fingerprint": fingerprint, "complete": True, "semantic": semantic,
            "samples": samples, "skipped": skipped}
    tmp = cache_dir / f".{CACHE_INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, cache_dir / CACHE_INDEX)
    log.info("cache complete: %d samples, %d skipped -> %s", len(samples), len(skipped), cache_dir)


def _repeats(index: DataIndex) -> dict:
    counts: dict = {}
    first: dict = {}
    for i, s in enumerate(index.samples):
        key = (s.row.manifest, s.row.line)
        first.setdefault(key, i)
        counts[first[key]] = counts.get(first[key], 0) + 1
    return counts


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="cache shards", unit="shard")


# ---------------------------------------------------------------------------------------------- reading

class CachedFeatureDataset(torch.utils.data.Dataset):
    """Feature samples from a complete cache, for `BatchItem`s of the same batch plan as raw data.

    semantic_anchoring: False drops the anchor tokens of a cache that has them (one cache serves a run with
    and one without semantic anchoring, e.g. the ablation); True refuses a cache without them; None takes
    what the cache holds."""

    def __init__(self, cache_dir, fingerprint: Optional[str] = None, semantic_anchoring: Optional[bool] = None):
        self.cache_dir = Path(cache_dir)
        index_file = self.cache_dir / CACHE_INDEX
        if not index_file.exists():
            raise SamaInputError(f"no complete feature cache in {self.cache_dir} ({CACHE_INDEX} is missing): run "
                                 "`python -m train cache --config CONFIG` first (it resumes if interrupted)")
        data = json.loads(index_file.read_text())
        if fingerprint is not None and data.get("fingerprint") != fingerprint:
            raise SamaInputError(f"the cache in {self.cache_dir} was built with other data/encoder settings; rebuild "
                                 "it (`python -m train cache`) into a new data.cache_dir")
        if semantic_anchoring is not None:
            _check_semantic(self.cache_dir, data, semantic_anchoring)
        self.semantic = data.get("semantic", False) if semantic_anchoring is None else semantic_anchoring
        _fill_keep_flags(self.cache_dir, data["samples"])
        # Repeated manifest rows were cached once; they come back `repeat` times here.
        self.samples = [s for s in data["samples"] for _ in range(s.get("repeat", 1))]
        self.skipped = data["skipped"]

    def __len__(self):
        return len(self.samples)

    def bucket_members(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s["bucket"], []).append(i)
        return out

    def negative_rows(self) -> torch.Tensor:
        with safe_open(str(self.cache_dir / "extras.safetensors"), framework="pt") as f:
            return f.get_tensor("negative").float()

    def __getitem__(self, item) -> dict:
        s = self.samples[item.index]
        sid = s["id"]
        with safe_open(str(self.cache_dir / s["shard"]), framework="pt") as f:
            def get(name):
                return f.get_tensor(f"{sid}/{name}").float()
            names = set(f.keys())
            if s["kind"] == RAW_VIDEO:
                pretext = item.pretext
                if pretext not in s["pretexts"]:
                    raise SamaInputError(f"the cache has no '{pretext}' variant of {s['where']}: it was built with "
                                         f"pretexts {s['pretexts']}; rebuild it with the current data.pretext_mix")
                source = None if pretext == NO_PRETEXT else get(f"source/{pretext}")
                text = get(f"text/{pretext}")
            else:
                source, text = get("source"), get("text")
            semantic = get("semantic") if self.semantic and f"{sid}/semantic" in names else None
            keep = get("keep") if f"{sid}/keep" in names else None
            target = get("target")
        return {"index": item.index, "target": target, "source": source, "text": text, "semantic": semantic,
                "keep": keep,
                "valid_latent_frames": s["valid_latent_frames"], "seed": item.seed, "pretext": item.pretext,
                "skipped": []}


def _fill_keep_flags(cache_dir: Path, samples: list[dict]) -> None:
    """Set each sample's "keep" flag from its shard's tensor names where the index does not record it.

    Indexes written before the flag existed (session 10's caches) lack it although their shards hold the
    masks; the training loop's "no keep mask" warning reads the flag. Only shard headers are read."""
    missing = [s for s in samples if "keep" not in s]
    by_shard: dict[str, list[dict]] = {}
    for s in missing:
        by_shard.setdefault(s["shard"], []).append(s)
    for shard, members in by_shard.items():
        with safe_open(str(cache_dir / shard), framework="pt") as f:
            names = set(f.keys())
        for s in members:
            s["keep"] = f"{s['id']}/keep" in names


def collate_features(items: list[dict]) -> dict:
    """Stack cached samples of one bucket into a feature batch (text rows zero-padded to the longest)."""
    has_source = {it["source"] is not None for it in items}
    if len(has_source) != 1:
        raise SamaInputError("a batch mixes samples with and without a source video (a data-plan bug)")
    semantic = [it["semantic"] for it in items]
    return {
        "target": torch.stack([it["target"] for it in items]),
        "source": torch.stack([it["source"] for it in items]) if has_source.pop() else None,
        "context": pad_rows([it["text"] for it in items]),
        "semantic": torch.stack(semantic) if semantic[0] is not None else None,
        "keep": keep_masks(items),
        "valid_latent_frames": torch.tensor([it["valid_latent_frames"] for it in items]),
        "seeds": torch.tensor([it["seed"] for it in items], dtype=torch.int64),
        "indices": [it["index"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
        "pretext": items[0]["pretext"],
    }
