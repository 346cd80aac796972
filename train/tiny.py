"""A tiny, fully local training workspace: random encoders, a random Wan base, synthetic data, configs.

`python -m train tiny-setup --out DIR` writes it; then `python -m train stage0 --config DIR/tiny_stage0.yaml`
runs the whole pipeline on a CPU in seconds (nothing is downloaded; the weights are random, so the point
is checking the machinery, not the pictures). The tests build the same workspace.

    DIR/encoders/vae/                 diffusers AutoencoderKLWan (base_dim 8, z_dim 16)
    DIR/encoders/umt5_tiny.safetensors UMT5 encoder (d_model 24) with its sentencepiece model embedded
    DIR/encoders/siglip/              SigLIP vision tower (width 48, 8x8 patch grid)
    DIR/models/tiny_wan_base.safetensors  a Wan2.1-layout DiT without the SAMA parts (stage 0 start)
    DIR/data/...                      moving-square clips and images, three JSONL manifests
    DIR/tiny_stage0.yaml, tiny_stage1.yaml   copies of train/configs/tiny_stage*.yaml
    DIR/tiny_stage0_cached.yaml          stage 0 from a feature cache
"""

from __future__ import annotations

import io
import json

from pathlib import Path

import torch

from sama_core.config import SamaConfig

# The tiny DiT of the tests (tests/tiny_models.py TINY), so text and SigLIP widths line up with it.
TINY_DIT = SamaConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=24, freq_dim=32,
                      siglip_dim=48, siglip_hidden_dim=40)
TINY_SIZE = 32  # pixels: 4x4 latents, 2x2 DiT patches

_WORDS = ("a red green blue yellow square circle moving left right up down over the background turn make "
          "into complete missing regions video restore normal speed shuffled order original edit").split()


# ---------------------------------------------------------------------------------------------- encoders

def make_tiny_vae(folder, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLWan
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLWan(base_dim=8, z_dim=16).eval()
    model.save_pretrained(str(folder))
    return Path(folder)


def _spiece_model(seed: int = 0) -> bytes:
    import random
    import sentencepiece
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    corpus += ["[Video edit] turn the red square blue", "[Complete the missing regions in the video.]",
               "[Restore the video to its normal speed.]",
               "[Restore the shuffled regions of the video to their original order.]"]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=80, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=False, minloglevel=2)
    return buffer.getvalue()


def make_tiny_text_encoder(path, d_model: int = TINY_DIT.text_dim, seed: int = 0) -> Path:
    """A ComfyUI-style single UMT5 file with the tokenizer embedded (`spiece_model`)."""
    import sentencepiece
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel
    spiece = _spiece_model(seed)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    config = UMT5Config(vocab_size=vocab + 4, d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=2,
                        d_kv=d_model // 2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(sd, str(path))
    return Path(path)


def make_tiny_siglip(folder, width: int = TINY_DIT.siglip_dim, seed: int = 0) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                num_attention_heads=4, image_size=32, patch_size=4, vision_use_head=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipVisionModel(config).eval()
    model.save_pretrained(str(folder))
    return Path(folder)


def make_tiny_wan_base(path, seed: int = 0) -> Path:
    """A random DiT in Wan2.1 layout without the SAMA parts (what stage 0 starts from at full size)."""
    import dataclasses
    from sama_core.loading import save_dit
    from sama_core.model import SamaDiT
    config = dataclasses.replace(TINY_DIT, has_sama=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamaDiT(config)
    save_dit(model, path, config)
    return Path(path)


# -------------------------------------------------------------------------------------------------- data

def square_clip(num_frames: int, height: int, width: int, color=(1.0, 0.2, 0.2), seed: int = 0,
                speed: float = 2.0) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1]: a coloured square moving right over a smooth random background."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 4, 4, generator=g) * 0.5 + 0.25
    background = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear",
                                                 align_corners=False)[0].permute(1, 2, 0)  # (H, W, 3)
    side = max(4, min(height, width) // 3)
    top = int(torch.randint(0, height - side + 1, (1,), generator=g))
    frames = background.expand(num_frames, height, width, 3).clone()
    for f in range(num_frames):
        left = int(round(f * speed)) % max(1, width - side)
        frames[f, top:top + side, left:left + side] = torch.tensor(color)
    return frames


def _write_image(path: Path, frame: torch.Tensor) -> None:
    from PIL import Image
    Image.fromarray((frame.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)


def make_tiny_dataset(folder) -> dict[str, Path]:
    """Raw videos, image edits and video edits (two sizes, a few frame counts) + their manifests."""
    from sama_core.video import write_video
    folder = Path(folder)
    for sub in ("raw", "images", "edits"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    red, blue = (1.0, 0.1, 0.1), (0.1, 0.2, 1.0)

    raw_rows = []
    for i in range(6):
        h, w = (TINY_SIZE, TINY_SIZE) if i < 4 else (TINY_SIZE, 2 * TINY_SIZE)
        frames = 9 if i % 3 else 7  # 7 frames fill the 5-frame bucket
        name = f"raw/clip{i}.mp4"
        write_video(folder / name, square_clip(frames, h, w, red, seed=i), 16)
        raw_rows.append({"video": name, "caption": f"a red square moving right, clip {i}"})

    image_rows = []
    for i in range(4):
        src, tgt = f"images/src{i}.png", f"images/tgt{i}.png"
        clip = square_clip(1, TINY_SIZE, TINY_SIZE, red, seed=100 + i)
        _write_image(folder / src, clip[0])
        _write_image(folder / tgt, square_clip(1, TINY_SIZE, TINY_SIZE, blue, seed=100 + i)[0])
        key = "source_image" if i % 2 else "original_image"  # both spellings are accepted
        image_rows.append({key: src, "target_image": tgt, ("instruction" if i % 2 else "prompt"): "make the square blue"})

    edit_rows = []
    for i in range(4):
        src, tgt = f"edits/src{i}.mp4", f"edits/tgt{i}.mp4"
        frames = 9 if i < 2 else 3  # 3-frame pairs are padded to the 5-frame bucket (masked in the loss)
        write_video(folder / src, square_clip(frames, TINY_SIZE, TINY_SIZE, red, seed=200 + i), 16)
        write_video(folder / tgt, square_clip(frames, TINY_SIZE, TINY_SIZE, blue, seed=200 + i), 16)
        key = "source_video" if i % 2 else "original_video"
        edit_rows.append({key: src, "target_video": tgt, "instruction": "turn the red square blue"})

    manifests = {"raw_videos": folder / "raw_videos.jsonl", "image_edits": folder / "image_edits.jsonl",
                 "video_edits": folder / "video_edits.jsonl"}
    for path, rows in zip(manifests.values(), (raw_rows, image_rows, edit_rows), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifests


# --------------------------------------------------------------------------------------------- workspace

CONFIG_TEMPLATES = Path(__file__).resolve().parent / "configs"


def tiny_config_text(stage: str) -> str:
    """The tiny config of a stage (train/configs/tiny_<stage>.yaml); its paths are relative to the workspace."""
    return (CONFIG_TEMPLATES / f"tiny_{stage}.yaml").read_text()


def make_tiny_workspace(out) -> dict[str, Path]:
    import yaml
    root = Path(out)
    (root / "encoders").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    paths = {
        "vae": make_tiny_vae(root / "encoders" / "vae"),
        "text_encoder": make_tiny_text_encoder(root / "encoders" / "umt5_tiny.safetensors"),
        "siglip": make_tiny_siglip(root / "encoders" / "siglip"),
        "wan_base": make_tiny_wan_base(root / "models" / "tiny_wan_base.safetensors"),
    }
    paths.update(make_tiny_dataset(root / "data"))
    for stage in ("stage0", "stage1"):
        path = root / f"tiny_{stage}.yaml"
        path.write_text(tiny_config_text(stage))
        paths[f"config_{stage}"] = path
    # The same stage 0 trained from a feature cache (`python -m train cache` first).
    cached = yaml.safe_load(tiny_config_text("stage0"))
    cached["data"]["cache_dir"] = "cache/stage0"
    cached["output_dir"] = "runs/stage0_cached"
    path = root / "tiny_stage0_cached.yaml"
    path.write_text("# tiny_stage0.yaml, trained from the feature cache: python -m train cache --config THIS first\n"
                    + yaml.safe_dump(cached, sort_keys=False))
    paths["config_stage0_cached"] = path
    return paths


__all__ = ["TINY_DIT", "make_tiny_workspace", "make_tiny_dataset", "square_clip", "make_tiny_vae",
           "make_tiny_text_encoder", "make_tiny_siglip", "make_tiny_wan_base", "tiny_config_text"]

