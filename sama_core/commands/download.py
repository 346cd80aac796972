"""`download [--dir models/] [--dry-run]`: the only networked command.

Fetches the model files through huggingface_hub into a ComfyUI-style models folder (resumable:
huggingface_hub keeps partial downloads and skips finished files). `--dry-run` prints the plan only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class DownloadItem:
    name: str              # what it is, for people
    repo_id: str
    patterns: tuple        # files (or glob patterns) inside the repository
    subdir: str            # destination inside the models folder (ComfyUI layout)
    required: bool = True
    flatten: bool = False  # single files: put them directly in subdir (where ComfyUI's loaders list them)


PLAN = (
    DownloadItem("SAMA-14B weights (layered on the Wan2.1 base)", "syxbb/SAMA-14B",
                 ("*.safetensors", "*.json"), "diffusion_models/SAMA-14B"),
    DownloadItem("Wan2.1-T2V-14B base DiT shards", "Wan-AI/Wan2.1-T2V-14B",
                 ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "config.json"), "diffusion_models/Wan2.1-T2V-14B"),
    DownloadItem("Wan2.1 VAE", "Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                 ("split_files/vae/wan_2.1_vae.safetensors",), "vae", flatten=True),
    DownloadItem("UMT5-XXL text encoder", "Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                 ("split_files/text_encoders/umt5_xxl_fp16.safetensors",), "text_encoders", flatten=True),
    DownloadItem("SigLIP so400m vision encoder (anchor frames, training)", "Comfy-Org/sigclip_vision_384",
                 ("sigclip_vision_patch14_384.safetensors",), "clip_vision", required=False, flatten=True),
)


def plan(models_dir, include_optional: bool = True) -> list[dict]:
    root = Path(models_dir)
    items = []
    for i in PLAN:
        if i.required or include_optional:
            item = dict(name=i.name, repo_id=i.repo_id, patterns=list(i.patterns), dest=str(root / i.subdir))
            if i.flatten:
                item["files"] = [str(root / i.subdir / Path(f).name) for f in i.patterns]
            items.append(item)
    return items


def register(sub):
    p = sub.add_parser("download", help="download SAMA-14B, the Wan2.1 base, VAE and text encoder (network)")
    p.add_argument("--dir", default="models", help="models folder (ComfyUI layout); default ./models")
    p.add_argument("--dry-run", action="store_true", help="print what would be downloaded, download nothing")
    p.add_argument("--no-optional", action="store_true", help="skip optional files (SigLIP)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    items = plan(args.dir, include_optional=not args.no_optional)
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for item in items:
            print(f"{item['name']}\n  from {item['repo_id']}: {', '.join(item['patterns'])}\n  to   {item['dest']}")
    if args.dry_run:
        return 0
    from huggingface_hub import hf_hub_download, snapshot_download
    for item in items:
        if "files" not in item:  # whole checkpoints keep their own folder (shards, index, config)
            snapshot_download(item["repo_id"], allow_patterns=item["patterns"], local_dir=item["dest"])
            continue
        for pattern, final in zip(item["patterns"], item["files"]):
            if Path(final).exists():
                continue  # already complete (huggingface_hub resumes partial files itself)
            fetched = Path(hf_hub_download(item["repo_id"], pattern, local_dir=item["dest"]))
            fetched.replace(final)  # flat, where ComfyUI's loaders and the workflows expect it
    print(f"done: models in {args.dir}")
    return 0
