"""Training data: JSONL manifests -> an index of samples with size buckets -> deterministic batches.

Manifest rows (one JSON object per line; relative paths are resolved against the manifest's folder):
    video edit:  {"source_video": ..., "target_video": ..., "instruction": ...}
                 (aliases: original_video / video for the source, prompt for the instruction)
    image edit:  {"source_image": ..., "target_image": ..., "instruction": ...}
                 (aliases: original_image / image, prompt)
    raw video:   {"video": ..., "caption": ...}            (aliases: prompt / text for the caption)
Optional per row: "width", "height", "num_frames" (skip probing the file's header).
Optional per edit row: "keep_mask", a mask video (image for image edits) of the target's size and length,
white where the edit must leave something the loss should watch closely (e.g. the objects the instruction
does not name); `train.keep_region_weight` weights the loss there (train/losses.py).

Each usable row becomes a `PlannedSample` with a bucket (group, frames, height, width): the size bucket
closest to its aspect ratio at the configured area, and the largest frame bucket (4k+1) the clip fills.
A clip shorter than the smallest frame bucket is padded by repeating its last frame and the padding is
masked out of the loss (`valid_frames`). Images are 1-frame samples and can share batches with nothing
but images of the same bucket; videos and images still mix within an epoch.

Batches: a global batch (batch_size * num_processes samples) always holds ONE bucket, so it stacks into
one tensor, and for raw videos one pretext (the no-pretext case has no source at all, which changes the
model's sequence layout). The plan of an epoch is a pure function of (seed, epoch): resuming at batch n
replays exactly the batches an uninterrupted run would have seen, and every sample carries its own seed
from which the trainer draws its sigma and noise, so results do not depend on the number of processes.

A file that cannot be read is skipped and counted: at indexing when its header cannot be read, and at
load time (a file that changed or is truncated) by taking the next sample of the same bucket instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from sama_core import video as vio
from sama_core.anchors import choose_anchor_frames
from sama_core.errors import SamaError, SamaFileNotFoundError, SamaInputError
from sama_core.pretext import (BLACK_SIGNED, NO_PRETEXT, PERTURBING_PRETEXTS, PRETEXT_NAMES, apply_pretext,
                               sample_pretexts, with_task_token)
from sama_core.prompts import clean_prompt, edit_prompt

log = logging.getLogger(__name__)

VIDEO_EDIT, IMAGE_EDIT, RAW_VIDEO = "video_edit", "image_edit", "raw_video"
KINDS = (VIDEO_EDIT, IMAGE_EDIT, RAW_VIDEO)
# Bucket groups: a batch never mixes edits (always a source) and raw videos (a pretext per batch).
EDIT_GROUP, RAW_GROUP = "edit", "raw"

_ALIASES = {
    VIDEO_EDIT: {"source": ("source_video", "original_video", "video"), "target": ("target_video",),
                 "text": ("instruction", "prompt")},
    IMAGE_EDIT: {"source": ("source_image", "original_image", "image"), "target": ("target_image",),
                 "text": ("instruction", "prompt")},
    RAW_VIDEO: {"source": (), "target": ("video",), "text": ("caption", "prompt", "text")},
}

# Decoding problems a sample may have; anything else is a bug and should surface.
LOAD_ERRORS = (SamaError, OSError, RuntimeError, ValueError)
# Lossless uint8 frame arrays ({"frames": (F, H, W, 3)}), as train/synthetic.py writes for SAMA-Shapes.
FRAME_ARRAY_SUFFIXES = (".npz", ".safetensors")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings): stable across processes, platforms and runs."""
    blob = json.dumps(parts, default=str).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


# ------------------------------------------------------------------------------------------ manifests

@dataclasses.dataclass(frozen=True)
class MediaRow:
    kind: str
    target: str                    # absolute path
    source: Optional[str]          # absolute path; None for raw videos
    text: str                      # edit instruction, or caption for raw videos
    manifest: str
    line: int
    hints: tuple = ()              # ((key, value), ...) of optional width / height / num_frames
    keep: Optional[str] = None     # absolute path of the optional keep mask (edit rows)

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def _detect_kind(row: dict) -> Optional[str]:
    if "target_video" in row:
        return VIDEO_EDIT
    if "target_image" in row:
        return IMAGE_EDIT
    if any(k in row for k in _ALIASES[RAW_VIDEO]["target"]) and any(k in row for k in _ALIASES[RAW_VIDEO]["text"]):
        return RAW_VIDEO
    return None


def _first(row: dict, keys: Sequence[str]):
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    return None


def parse_row(row: dict, manifest: Path, line: int, kind: str = "auto") -> MediaRow:
    where = f"{manifest}:{line}"
    if not isinstance(row, dict):
        raise SamaInputError(f"{where}: each manifest line must be a JSON object, got {type(row).__name__}")
    if kind == "auto":
        kind = _detect_kind(row)
        if kind is None:
            raise SamaInputError(
                f"{where}: cannot tell what this row is (keys {sorted(row)}); a video edit has source_video + "
                "target_video + instruction, an image edit source_image + target_image + instruction, a raw "
                "video video + caption")
    if kind not in KINDS:
        raise SamaInputError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    names = _ALIASES[kind]
    target = _first(row, names["target"])
    source = _first(row, names["source"]) if names["source"] else None
    text = _first(row, names["text"])
    missing = [role for role, value in (("target", target), ("text", text)) if value is None]
    if names["source"] and source is None:
        missing.append("source")
    if missing:
        wanted = {role: "/".join(names[role]) for role in missing}
        raise SamaInputError(f"{where}: this {kind} row lacks {', '.join(f'{r} ({k})' for r, k in wanted.items())}")
    if not isinstance(text, str) or not clean_prompt(text):
        raise SamaInputError(f"{where}: the {'caption' if kind == RAW_VIDEO else 'instruction'} is empty")

    def resolve(p):
        if not isinstance(p, str):
            raise SamaInputError(f"{where}: paths must be strings, got {p!r}")
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (manifest.parent / path).resolve())

    hints = tuple((k, int(row[k])) for k in ("width", "height", "num_frames") if row.get(k) is not None)
    keep = row.get("keep_mask")
    if keep is not None and kind == RAW_VIDEO:
        raise SamaInputError(f"{where}: keep_mask belongs to edit rows (the pixels an edit must keep); a raw video "
                             "has no edit: remove it from this row")
    return MediaRow(kind, resolve(target), resolve(source) if source else None, text, str(manifest), line, hints,
                    resolve(keep) if keep is not None else None)


def read_manifest(path, kind: str = "auto") -> list[MediaRow]:
    """Every row of a JSONL manifest; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise SamaFileNotFoundError(f"manifest not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SamaInputError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON "
                                     "object") from None
            rows.append(parse_row(obj, path, number, kind))
    if not rows:
        raise SamaInputError(f"manifest {path} has no rows")
    return rows


# -------------------------------------------------------------------------------------------- probing

@dataclasses.dataclass(frozen=True)
class MediaMeta:
    width: int
    height: int
    num_frames: int                # 1 for images; for videos the header's duration * fps


def probe_media(path: str) -> MediaMeta:
    """Size and frame count from the file header (no decoding of the frames)."""
    p = Path(path)
    if not p.is_file():
        raise SamaFileNotFoundError(f"file not found: {p}")
    if p.suffix.lower() in FRAME_ARRAY_SUFFIXES:
        frames = _frame_array(p)
        return MediaMeta(frames.shape[2], frames.shape[1], frames.shape[0])
    if p.suffix.lower() in vio.IMAGE_EXTENSIONS:
        from PIL import Image, ImageOps
        with Image.open(p) as im:
            w, h = ImageOps.exif_transpose(im).size if im.getexif().get(0x0112) else im.size
        return MediaMeta(w, h, 1)
    import imageio_ffmpeg
    reader = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(reader)
    finally:
        reader.close()
    w, h = meta["size"]
    fps, duration = meta.get("fps") or 0, meta.get("duration") or 0
    frames = int(math.floor(duration * fps + 0.5)) if fps and duration else 0
    if frames < 1:
        frames = imageio_ffmpeg.count_frames_and_secs(str(p))[0]  # no usable header: count by decoding
    if frames < 1:
        raise SamaInputError(f"{p} has no frames")
    return MediaMeta(int(w), int(h), int(frames))


# ------------------------------------------------------------------------------------------- planning

@dataclasses.dataclass(frozen=True)
class Bucket:
    group: str                     # "edit" or "raw"
    frames: int                    # 4k+1 (1 for images)
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.group}-{self.frames}x{self.height}x{self.width}"


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    row: MediaRow
    bucket: Bucket
    valid_frames: int              # real frames; frames beyond are padding (masked out of the loss)
    available_frames: int          # frames the clip offers after the stride (for random starts)


@dataclasses.dataclass
class BucketSpec:
    sizes: list                    # [(width, height)]
    frame_buckets: list            # sorted 4k+1 counts > 1 (videos; images are always 1 frame)
    stride: int = 1

    @classmethod
    def from_config(cls, data_cfg) -> "BucketSpec":
        if data_cfg.buckets is not None:
            sizes = [tuple(wh) for wh in data_cfg.buckets]
        else:
            sizes = vio.bucket_sizes(data_cfg.bucket_area, data_cfg.bucket_multiple)
        # 1 frame is the images' bucket; videos use the longer ones
        video_frames = sorted({f for f in data_cfg.frame_buckets if f > 1})
        if not video_frames:
            raise SamaInputError(f"data.frame_buckets {data_cfg.frame_buckets} has no video length (4k+1 > 1)")
        return cls(sizes, video_frames, data_cfg.frame_stride)

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return vio.choose_bucket(width, height, buckets=self.sizes)

    def frames_for(self, available: int) -> int:
        """The largest frame bucket the clip fills, else the smallest (then padded)."""
        fitting = [f for f in self.frame_buckets if f <= available]
        return fitting[-1] if fitting else self.frame_buckets[0]


def plan_sample(row: MediaRow, source_meta: Optional[MediaMeta], target_meta: MediaMeta,
                spec: BucketSpec) -> PlannedSample:
    size_from = source_meta if source_meta is not None else target_meta
    width, height = spec.size_for(size_from.width, size_from.height)
    if row.kind == IMAGE_EDIT:
        return PlannedSample(row, Bucket(EDIT_GROUP, 1, height, width), 1, 1)
    frames = target_meta.num_frames if source_meta is None else min(source_meta.num_frames, target_meta.num_frames)
    available = math.ceil(frames / spec.stride)
    count = spec.frames_for(available)
    group = RAW_GROUP if row.kind == RAW_VIDEO else EDIT_GROUP
    return PlannedSample(row, Bucket(group, count, height, width), min(available, count), available)


def _meta_from_hints(row: MediaRow) -> Optional[MediaMeta]:
    hints = dict(row.hints)
    if "width" in hints and "height" in hints:
        frames = 1 if row.kind == IMAGE_EDIT else hints.get("num_frames")
        if frames:
            return MediaMeta(hints["width"], hints["height"], frames)
    return None


def _probe_row(row: MediaRow, spec: BucketSpec) -> PlannedSample:
    hinted = _meta_from_hints(row)
    target = hinted or probe_media(row.target)
    source = None
    if row.source is not None:
        source = hinted or probe_media(row.source)
    return plan_sample(row, source, target, spec)


@dataclasses.dataclass
class DataIndex:
    samples: list                  # [PlannedSample], in manifest order (repeats expanded)
    skipped: list                  # [(where, reason)] rows that could not be used

    def buckets(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s.bucket.key, []).append(i)
        return dict(sorted(out.items()))

    def summary(self) -> str:
        counts = {k: len(v) for k, v in self.buckets().items()}
        return f"{len(self.samples)} samples in {len(counts)} buckets {counts}; {len(self.skipped)} skipped"


def build_index(cfg, manifests=None, probe_workers: Optional[int] = None) -> DataIndex:
    """Parse the manifests and probe every file (in threads: each probe is an ffmpeg process)."""
    spec = BucketSpec.from_config(cfg.data)
    specs = manifests if manifests is not None else cfg.manifest_specs()
    if not specs:
        raise SamaInputError("data.manifests is empty: give at least one JSONL manifest")
    rows, repeats = [], []
    for m in specs:
        for row in read_manifest(m.path, m.kind):
            rows.append(row)
            repeats.append(m.repeat)
    workers = max(1, probe_workers or cfg.data.probe_workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_probe_row, row, spec) for row in rows]
        samples, skipped = [], []
        for row, repeat, fut in zip(rows, repeats, futures, strict=True):
            try:
                planned = fut.result()
            except LOAD_ERRORS as e:
                skipped.append((row.where, f"{type(e).__name__}: {e}"))
                log.warning("skipped %s (%s): %s", row.where, row.target, e)
                continue
            samples.extend([planned] * repeat)
    if not samples:
        raise SamaInputError(f"no usable sample in the manifests ({len(skipped)} skipped, e.g. {skipped[:2]})")
    index = DataIndex(samples, skipped)
    log.info("data index: %s", index.summary())
    return index


def index_to_json(index: DataIndex) -> dict:
    return {"samples": [{"row": dataclasses.asdict(s.row), "bucket": dataclasses.asdict(s.bucket),
                         "valid_frames": s.valid_frames, "available_frames": s.available_frames}
                        for s in index.samples],
            "skipped": index.skipped}


def index_from_json(d: dict) -> DataIndex:
    samples = []
    for s in d["samples"]:
        row = dict(s["row"])
        row["hints"] = tuple(tuple(h) for h in row["hints"])
        samples.append(PlannedSample(MediaRow(**row), Bucket(**s["bucket"]), s["valid_frames"],
                                     s["available_frames"]))
    return DataIndex(samples, [tuple(x) for x in d["skipped"]])


def load_or_build_index(cfg, path: Path) -> DataIndex:
    """The index is saved next to the run (keyed by the manifests' contents and the bucket settings), so a
    resumed run or a second stage on the same data does not probe every file again."""
    key = index_key(cfg)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return index_from_json(saved)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable data index %s", path)
    index = build_index(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, **index_to_json(index)}))
    os.replace(tmp, path)
    return index


def index_key(cfg) -> str:
    h = hashlib.sha256()
    for m in cfg.manifest_specs():
        # The real file, links followed: a run whose data folder links to another run's (an ablation that
        # reuses it) has the same index, so the same cache fingerprint.
        h.update(json.dumps({**dataclasses.asdict(m), "path": str(Path(m.path).resolve())}).encode())
        h.update(Path(m.path).read_bytes())
    h.update(cfg.fingerprint("data.bucket_area", "data.bucket_multiple", "data.buckets", "data.frame_buckets",
                             "data.frame_stride").encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- batching

@dataclasses.dataclass(frozen=True)
class BatchItem:
    """What a dataset is asked for: a sample, the pretext of its batch, and the sample's own seed."""
    index: int
    pretext: str
    seed: int


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    bucket: str
    items: tuple                   # (BatchItem,) * global batch size


class BucketBatchPlan:
    """The deterministic sequence of global batches, epoch after epoch.

    Epoch e: each bucket's samples are shuffled with a generator seeded by (seed, e, bucket) and cut into
    global batches (an incomplete last batch is dropped); the batches of all buckets are then shuffled
    together. Raw-video batches draw their pretext from the mix; the pretext and each sample's seed are
    functions of (seed, e, batch number, position), nothing else.
    """

    def __init__(self, bucket_members: dict, global_batch: int, seed: int, pretext_mix: Optional[dict] = None):
        self.global_batch = global_batch
        self.seed = seed
        self.pretext_mix = pretext_mix
        self.bucket_members = dict(sorted(bucket_members.items()))  # {bucket key: [sample index]}
        self.batches_per_epoch = sum(len(m) // global_batch for m in self.bucket_members.values())
        small = {k: len(m) for k, m in self.bucket_members.items() if len(m) < global_batch}
        if small:
            log.warning("buckets with fewer samples than one global batch (%d) are never used: %s",
                        global_batch, small)
        if self.batches_per_epoch == 0:
            raise SamaInputError(
                f"no bucket holds a full global batch of {global_batch} samples (batch_size x processes); "
                f"buckets: { {k: len(m) for k, m in self.bucket_members.items()} }. Lower train.batch_size, "
                "use fewer buckets (data.buckets / data.frame_buckets) or add data")

    def epoch(self, epoch: int) -> list[GlobalBatch]:
        batches = []
        for key, members in self.bucket_members.items():
            g = torch.Generator().manual_seed(derive_seed(self.seed, "bucket-order", epoch, key))
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            for start in range(0, len(order) - self.global_batch + 1, self.global_batch):
                batches.append((key, order[start:start + self.global_batch]))
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch-order", epoch))
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        out = []
        for number, (key, indices) in enumerate(batches):
            pretext = "-"
            if key.startswith(RAW_GROUP + "-"):
                pg = torch.Generator().manual_seed(derive_seed(self.seed, "pretext", epoch, number))
                pretext = sample_pretexts(1, pg, self.pretext_mix)[0]
            items = tuple(BatchItem(i, pretext, derive_seed(self.seed, "sample", epoch, number, pos))
                          for pos, i in enumerate(indices))
            out.append(GlobalBatch(key, items))
        return out

    def iterate(self, start_batch: int = 0) -> Iterator[GlobalBatch]:
        """Global batches from position `start_batch` (counted from the first batch of epoch 0) onwards."""
        epoch, offset = divmod(start_batch, self.batches_per_epoch)
        while True:
            for batch in self.epoch(epoch)[offset:]:
                yield batch
            epoch, offset = epoch + 1, 0


class ProcessBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of every global batch, for a DataLoader(batch_sampler=...). Endless.

    One global batch feeds one optimizer step: batch_size * accumulation_steps * num_processes samples.
    Micro-batch m of process r is the slice (m * num_processes + r) of it, so any split of the same
    global batch over processes and accumulation steps trains on the same samples with the same seeds.
    """

    def __init__(self, plan: BucketBatchPlan, num_processes: int = 1, process_index: int = 0,
                 accumulation_steps: int = 1, start_batch: int = 0):
        parts = num_processes * accumulation_steps
        if plan.global_batch % parts:
            raise SamaInputError(f"global batch {plan.global_batch} does not split into {num_processes} processes "
                                 f"x {accumulation_steps} accumulation steps")
        self.plan, self.start_batch = plan, start_batch
        self.micro = plan.global_batch // parts
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps = accumulation_steps

    def __iter__(self):
        for batch in self.plan.iterate(self.start_batch):
            for m in range(self.accumulation_steps):
                lo = (m * self.num_processes + self.process_index) * self.micro
                yield list(batch.items[lo:lo + self.micro])

    def __len__(self):  # DataLoader asks; the stream is endless, the loop counts steps itself
        return 2 ** 62


# -------------------------------------------------------------------------------------------- loading

def _fit(frames: torch.Tensor, bucket: Bucket, mode: str) -> torch.Tensor:
    """(n, h, w, 3) in [0, 1] -> (n, H, W, 3) at the bucket size."""
    plan = vio.plan_resize((frames.shape[2], frames.shape[1]), (bucket.width, bucket.height), mode)
    return vio.apply_resize(frames, plan)


def _pad_frames(frames: torch.Tensor, count: int) -> torch.Tensor:
    """Repeat the last frame up to `count` frames (the bucket's 4k+1 length)."""
    if frames.shape[0] >= count:
        return frames[:count]
    return torch.cat([frames, frames[-1:].expand(count - frames.shape[0], *frames.shape[1:])])


def _frame_array(path) -> torch.Tensor:
    from .synthetic import load_clip  # the reader of that format lives with its writer
    return load_clip(path)  # (F, H, W, 3) float32 in [0, 1]


def read_clip(path: str, sample: PlannedSample, start: int, stride: int, mode: str) -> tuple[torch.Tensor, int]:
    """Frames (F, H, W, 3) in [0, 1] at the sample's bucket, padded to F; and the number of real frames."""
    bucket = sample.bucket
    if Path(path).suffix.lower() in FRAME_ARRAY_SUFFIXES:
        frames = _frame_array(path)[start * stride::stride][: sample.valid_frames]
        if frames.shape[0] == 0:
            raise SamaInputError(f"{path} has no frames from frame {start * stride} on")
    elif bucket.frames == 1:
        frames, _ = vio.read_media(path)
        frames = frames[:1]
    else:
        frames, _ = vio.read_video(path, frame_range=(start * stride, None), stride=stride,
                                   max_frames=sample.valid_frames)
    frames = _fit(frames, bucket, mode)
    valid = min(frames.shape[0], bucket.frames)
    return _pad_frames(frames, bucket.frames), valid


def clip_start(sample: PlannedSample, mode: str, generator: torch.Generator) -> int:
    """First frame (in strided frames) of the clip: 0, or uniform over the starts that fill the bucket."""
    slack = sample.available_frames - sample.valid_frames
    if mode != "random" or slack <= 0:
        return 0
    return int(torch.randint(0, slack + 1, (1,), generator=generator))


def make_source(frames: torch.Tensor, pretext: str, generator: torch.Generator) -> torch.Tensor:
    """The perturbed source of a raw video: (F, H, W, 3) in [0, 1] -> same, the pretext applied in [-1, 1]."""
    signed = frames * 2.0 - 1.0
    out = apply_pretext(pretext, signed, generator, channels_last=True,
                        **({"fill": BLACK_SIGNED} if pretext == "cube" else {})).frames
    return (out + 1.0) * 0.5


def prompt_for(sample: PlannedSample, pretext: str, edit_prefix: bool) -> str:
    """The text the DiT sees: "[Video edit] instruction" for edits, "[task token] caption" for raw videos
    with a pretext, the bare caption for plain generation."""
    if sample.row.kind == RAW_VIDEO:
        caption = clean_prompt(sample.row.text)
        return caption if pretext == NO_PRETEXT else with_task_token(pretext, caption)
    return edit_prompt(sample.row.text, prefix=edit_prefix)


def anchor_indices(valid_frames: int, num_anchors: int) -> list[int]:
    """N uniform frames of the real (unpadded) target frames; a clip with fewer real frames than N (an image)
    repeats its last one, so every sample of a batch has the same 65 * N tokens."""
    indices = choose_anchor_frames(valid_frames, min(num_anchors, valid_frames))
    return indices + [indices[-1]] * (num_anchors - len(indices))


class RawMediaDataset(torch.utils.data.Dataset):
    """Decodes one sample per BatchItem: frames at the bucket size, the pretext source, prompt, anchor frames.

    Returns a dict (see `collate_raw`). A sample that fails to load is replaced by the next sample of its
    bucket (its path goes into "skipped"); after `max_replacements` failures in a row the error is raised.
    """

    def __init__(self, index: DataIndex, data_cfg):
        self.index = index
        self.cfg = data_cfg
        self.bucket_members = index.buckets()
        self.position = {i: p for members in self.bucket_members.values() for p, i in enumerate(members)}
        self.bad: set[int] = set()

    def __len__(self):
        return len(self.index.samples)

    def __getitem__(self, item: BatchItem) -> dict:
        skipped = []
        sample = self.index.samples[item.index]
        members = self.bucket_members[sample.bucket.key]
        position = self.position[item.index]
        tries = min(len(members), self.cfg.max_replacements + 1)
        for attempt in range(tries):
            index = members[(position + attempt) % len(members)]
            if index in self.bad:
                continue
            try:
                out = self.load(index, item.pretext, item.seed)
                out["skipped"] = skipped
                return out
            except LOAD_ERRORS as e:
                self.bad.add(index)
                where = self.index.samples[index].row.where
                skipped.append(f"{where}: {e}")
                log.warning("could not load %s (%s); using another sample of its bucket", where, e)
        raise SamaInputError(f"{len(skipped)} samples of bucket {sample.bucket.key} failed to load in a row "
                             f"({skipped[:3]}); check the files of this bucket")

    def load(self, index: int, pretext: str, seed: int) -> dict:
        sample = self.index.samples[index]
        g = torch.Generator().manual_seed(derive_seed(seed, "load"))
        start = clip_start(sample, self.cfg.clip_start, g)
        target, valid = read_clip(sample.row.target, sample, start, self.cfg.frame_stride, self.cfg.resize_mode)
        source = None
        if sample.row.source is not None:
            source, source_valid = read_clip(sample.row.source, sample, start, self.cfg.frame_stride,
                                             self.cfg.resize_mode)
            valid = min(valid, source_valid)
        elif pretext != NO_PRETEXT:
            source = make_source(target, pretext, g)
        keep = None
        if sample.row.keep is not None:  # the same frames, crop and resize as the target
            keep, _ = read_clip(sample.row.keep, sample, start, self.cfg.frame_stride, self.cfg.resize_mode)
            keep = keep.mean(-1)  # (F, H, W) in [0, 1]
        anchors = None
        if self.cfg.semantic_anchoring:
            anchors = target[anchor_indices(valid, self.cfg.num_anchors)]  # (N, H, W, 3)
        return {"index": index, "bucket": sample.bucket.key, "target": target, "source": source,
                "prompt": prompt_for(sample, pretext, self.cfg.edit_prefix), "anchors": anchors,
                "valid_frames": valid, "seed": seed, "pretext": pretext, "keep": keep}


def collate_raw(items: list[dict]) -> dict:
    """Stack one bucket's samples: frames -> (B, 3, F, H, W) in [-1, 1] (the VAE input)."""
    def video(frames):  # (F, H, W, 3) [0, 1] -> (3, F, H, W) [-1, 1]
        return frames.permute(3, 0, 1, 2) * 2.0 - 1.0
    has_source = {it["source"] is not None for it in items}
    if len(has_source) != 1:
        raise SamaInputError("a batch mixes samples with and without a source video (a data-plan bug)")
    return {
        "target_frames": torch.stack([video(it["target"]) for it in items]),  # (B, 3, F, H, W)
        "source_frames": torch.stack([video(it["source"]) for it in items]) if has_source.pop() else None,
        "keep_masks": keep_masks(items),  # (B, F, H, W) or None
        "prompts": [it["prompt"] for it in items],
        "anchor_frames": (torch.stack([it["anchors"] for it in items])  # (B, N, H, W, 3)
                          if items[0]["anchors"] is not None else None),
        "valid_frames": torch.tensor([it["valid_frames"] for it in items]),
        "seeds": torch.tensor([it["seed"] for it in items], dtype=torch.int64),
        "indices": [it["index"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
        "pretext": items[0]["pretext"],
    }


def keep_masks(items: list[dict]) -> Optional[torch.Tensor]:
    """The batch's keep masks (B, F, H, W), zeros for a sample whose row has none; None when no row has one."""
    present = [it.get("keep") for it in items if it.get("keep") is not None]
    if not present:
        return None
    empty = torch.zeros_like(present[0])
    return torch.stack([it["keep"] if it.get("keep") is not None else empty for it in items])


def pretext_names_in(mix: dict) -> list[str]:
    """The pretexts of a mix with a positive weight (what the cache must hold for raw videos)."""
    unknown = set(mix) - set(PRETEXT_NAMES)
    if unknown:
        raise SamaInputError(f"data.pretext_mix has unknown pretexts {sorted(unknown)}; use {PRETEXT_NAMES}")
    return [name for name in PRETEXT_NAMES if mix.get(name, 0) > 0]


__all__ = ["KINDS", "PERTURBING_PRETEXTS", "MediaRow", "PlannedSample", "Bucket", "BucketSpec", "DataIndex",
           "BatchItem", "BucketBatchPlan", "ProcessBatchSampler", "RawMediaDataset", "read_manifest",
           "build_index", "collate_raw", "derive_seed", "probe_media", "prompt_for", "make_source"]
