"""sama_core.anchors: anchor-frame choice, 65-token pooling (against explicit loops), preprocessing
(against the HF SigLIP processor), SigLIP loading from a folder and from single files (ComfyUI layout),
on tiny random SigLIP models saved by the tests."""

import json
import math
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import comfyui_dir
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig, SiglipVisionModel

from sama_core.anchors import (TOKENS_PER_ANCHOR, AnchorEncoder, choose_anchor_frames, frames_to_nchw,
                               load_siglip_vision, pool_anchor_tokens, preprocess_for_siglip)
from sama_core.errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError

WIDTH, HEADS = 32, 4


def make_tiny_siglip(image_size=32, patch_size=2, seed=0):
    config = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=HEADS, image_size=image_size, patch_size=patch_size,
                                vision_use_head=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipVisionModel(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorms start at exactly 1/0: perturb so a mis-mapped tensor shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def random_video(frames=9, height=40, width=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, height, width, 3, generator=g)  # ComfyUI IMAGE layout, [0, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    model = make_tiny_siglip()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    files = {"folder": root / "siglip_folder", "comfyui": root / "sigclip_vision_tiny.safetensors",
             "transformers": root / "siglip_plain.safetensors"}
    model.save_pretrained(str(files["folder"]))
    safetensors.torch.save_file({"vision_model." + k: v for k, v in sd.items()}, str(files["comfyui"]))
    safetensors.torch.save_file(sd, str(files["transformers"]))
    return {"model": model, "state_dict": sd, "files": files, "encoder": AnchorEncoder(model)}


# ------------------------------------------------------------------------------------------ frame choice

def test_default_anchor_is_the_first_frame():
    assert choose_anchor_frames(81) == [0]
    assert choose_anchor_frames(1) == [0]
    assert choose_anchor_frames(81, n=1) == [0]


@pytest.mark.parametrize("num_frames,n,expected", [
    (9, 3, [0, 4, 8]),  # spacing 4
    (10, 4, [0, 3, 6, 9]),  # spacing 3
    (4, 3, [0, 2, 3]),  # spacing 1.5: 1.5 rounds half up to 2
    (6, 4, [0, 2, 3, 5]),  # spacing 5/3: 1.67 -> 2, 3.33 -> 3
    (81, 4, [0, 27, 53, 80]),  # spacing 80/3: 26.67 -> 27, 53.33 -> 53
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_uniform_anchor_frames(num_frames, n, expected):
    assert choose_anchor_frames(num_frames, n) == expected


def test_uniform_anchor_frames_are_distinct_and_span_the_video():
    for num_frames in range(1, 41):
        for n in range(1, num_frames + 1):
            indices = choose_anchor_frames(num_frames, n)
            assert len(indices) == n and indices == sorted(set(indices))
            assert indices[0] == 0 and (n == 1 or indices[-1] == num_frames - 1)
            spacing = (num_frames - 1) / (n - 1) if n > 1 else 0
            assert all(abs(index - i * spacing) <= 0.5 for i, index in enumerate(indices))


def test_user_given_anchor_frames():
    assert choose_anchor_frames(9, frames=[3, -1]) == [3, 8]
    assert choose_anchor_frames(9, n=2, frames=[8, 0]) == [8, 0]
    assert choose_anchor_frames(9, frames=torch.tensor([2, 5])) == [2, 5]


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_frames=9, frames=[9]), r"anchor frame 9 is outside the 9-frame video: use 0..8"),
    (dict(num_frames=9, frames=[-10]), "outside"),
    (dict(num_frames=9, frames=[1, 1]), "repeat a frame"),
    (dict(num_frames=9, frames=[1.5]), "must be integers"),
    (dict(num_frames=9, frames=[True]), "must be integers"),
    (dict(num_frames=9, frames=[]), "empty"),
    (dict(num_frames=9, n=3, frames=[0, 1]), "3 anchors were asked for but 2"),
    (dict(num_frames=3, n=4), "cannot choose 4 distinct anchor frames from a 3-frame video"),
    (dict(num_frames=9, n=0), "positive integer"),
    (dict(num_frames=0), "num_frames must be a positive integer"),
])
def test_bad_anchor_frames_are_refused(kwargs, message):
    with pytest.raises(SamaInputError, match=message):
        choose_anchor_frames(**kwargs)


# ------------------------------------------------------------------------------------------------ pooling

def explicit_pool(tokens, rows, cols, out=8):
    """Independent reference: each local token averages the patches of its adaptive-pool bin, whose
    rows are floor(i * rows / out) .. ceil((i + 1) * rows / out) - 1 (same for columns); the global token
    averages all patches. Written with loops on purpose."""
    batch, _, width = tokens.shape
    grid = tokens.reshape(batch, rows, cols, width).double()
    result = torch.zeros(batch, out * out + 1, width, dtype=torch.float64)
    for i in range(out):
        r0, r1 = math.floor(i * rows / out), math.ceil((i + 1) * rows / out)
        for j in range(out):
            c0, c1 = math.floor(j * cols / out), math.ceil((j + 1) * cols / out)
            total = torch.zeros(batch, width, dtype=torch.float64)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    total += grid[:, r, c]
            result[:, i * out + j] = total / ((r1 - r0) * (c1 - c0))
    result[:, -1] = grid.reshape(batch, -1, width).sum(1) / (rows * cols)
    return result.float()


def test_pooling_on_a_divisible_grid_averages_2x2_blocks():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16 * 16, 5, generator=g)
    pooled = pool_anchor_tokens(tokens)
    assert pooled.shape == (2, TOKENS_PER_ANCHOR, 5) and TOKENS_PER_ANCHOR == 65
    torch.testing.assert_close(pooled, explicit_pool(tokens, 16, 16), rtol=1e-5, atol=1e-6)
    # bin (row 1, col 2) is patches rows 2-3, cols 4-5 of the 16x16 grid
    block = tokens.reshape(2, 16, 16, 5)[:, 2:4, 4:6].mean(dim=(1, 2))
    torch.testing.assert_close(pooled[:, 1 * 8 + 2], block, rtol=1e-5, atol=1e-6)


def test_pooling_on_the_27x27_so400m_grid_uses_floor_ceil_bins():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 27 * 27, 7, generator=g)
    pooled = pool_anchor_tokens(tokens, grid=27)
    torch.testing.assert_close(pooled, explicit_pool(tokens, 27, 27), rtol=1e-5, atol=1e-6)
    # bin 1 spans rows floor(27/8)=3 .. ceil(54/8)-1=6 (4 rows, overlapping bin 0's row 3)
    block = tokens.reshape(1, 27, 27, 7)[:, 3:7, 0:4].mean(dim=(1, 2))
    torch.testing.assert_close(pooled[:, 1 * 8 + 0], block, rtol=1e-5, atol=1e-6)


def test_pooling_non_square_grid_and_dtype():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(1, 12 * 20, 3, generator=g)
    torch.testing.assert_close(pool_anchor_tokens(tokens, grid=(12, 20)), explicit_pool(tokens, 12, 20),
                               rtol=1e-5, atol=1e-6)
    assert pool_anchor_tokens(tokens.bfloat16(), grid=(12, 20)).dtype == torch.bfloat16


def test_pooling_errors():
    with pytest.raises(SamaInputError, match="730 patch tokens do not form a square grid.*class token"):
        pool_anchor_tokens(torch.zeros(1, 730, 4))
    with pytest.raises(SamaInputError, match="grid 27x27 does not match 256"):
        pool_anchor_tokens(torch.zeros(1, 256, 4), grid=27)
    with pytest.raises(SamaInputError, match=r"\(B, P\*P, D\)"):
        pool_anchor_tokens(torch.zeros(729, 4))


# ------------------------------------------------------------------------------------------ preprocessing

def test_frame_layouts_are_understood():
    video = random_video(frames=5, height=8, width=12)
    expected = video.permute(0, 3, 1, 2)  # (F, 3, H, W)
    assert torch.equal(frames_to_nchw(video), expected)
    assert torch.equal(frames_to_nchw(expected), expected)
    vae_video = (expected * 2 - 1).transpose(0, 1)[None]  # (1, 3, F, H, W) in [-1, 1]
    torch.testing.assert_close(frames_to_nchw(vae_video, value_range=(-1, 1)), expected)
    as_uint8 = (video * 255).round().to(torch.uint8)
    torch.testing.assert_close(frames_to_nchw(as_uint8), expected, atol=0.5 / 255 + 1e-6, rtol=0)
    rgba = torch.cat([video, torch.ones_like(video[..., :1])], dim=-1)
    assert torch.equal(frames_to_nchw(rgba), expected)
    with pytest.raises(SamaInputError, match=r"\(N, H, W, 3\)"):
        frames_to_nchw(torch.zeros(5, 8, 12))


def test_preprocessing_is_close_to_the_hf_siglip_processor():
    """Ours: float antialiased bicubic (torch); HF SiglipImageProcessor (PIL backend, what the released
    code used): bicubic on 8-bit images. Measured on this input: max 0.0078, mean 0.0023 in the
    normalised [-1, 1] scale, i.e. about one 8-bit level (2/255 = 0.0078)."""
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(2, 3, 30, 52, generator=g), size=(96, 160), mode="bilinear")
    frames = (smooth.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # (N, H, W, 3) uint8
    reference = SiglipImageProcessorPil(size={"height": 64, "width": 64})(
        images=[f.numpy() for f in frames], return_tensors="pt").pixel_values
    ours = preprocess_for_siglip(frames_to_nchw(frames), 64)
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert (ours - reference).abs().max() < 0.02
    assert (ours - reference).abs().mean() < 0.004


def test_center_crop_option_takes_the_middle():
    image = torch.zeros(1, 3, 32, 64)
    image[..., 16:48] = 1.0  # the middle 32 columns are white
    cropped = preprocess_for_siglip(image, 32, crop=True)
    assert torch.equal(cropped, torch.ones(1, 3, 32, 32))  # white, normalised to +1
    squashed = preprocess_for_siglip(image, 32)
    assert squashed[..., 0].max() < 0  # the black border survives when squashing


# ------------------------------------------------------------------------------------------------ encoder

def reference_tokens(model, images_nhwc, layer=None):
    """Independent pipeline: torch resize + SigLIP normalisation, the model, then explicit pooling."""
    x = images_nhwc.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    with torch.no_grad():
        out = model(pixel_values=(x - 0.5) / 0.5, output_hidden_states=True)
    tokens = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return explicit_pool(tokens, 16, 16)


def test_encode_gives_65_tokens_of_the_first_frame(tiny):
    video = random_video()
    tokens = tiny["encoder"].encode(video)
    assert tokens.shape == (1, 65, WIDTH) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[0], reference_tokens(tiny["model"], video[:1])[0], rtol=1e-4, atol=1e-5)


def test_n_anchors_give_65n_tokens_in_anchor_order(tiny):
    video = random_video()
    encoder = tiny["encoder"]
    per_frame = reference_tokens(tiny["model"], video)  # (9, 65, W)
    three = encoder.encode(video, num_anchors=3)
    assert three.shape == (1, 3 * 65, WIDTH)
    torch.testing.assert_close(three[0], per_frame[[0, 4, 8]].reshape(-1, WIDTH), rtol=1e-4, atol=1e-5)
    given = encoder.encode(video, anchor_frames=[8, 2])
    torch.testing.assert_close(given[0], per_frame[[8, 2]].reshape(-1, WIDTH), rtol=1e-4, atol=1e-5)
    images = encoder.encode_images(video[:2])
    assert images.shape == (2, 65, WIDTH)


def test_hidden_layer_option(tiny):
    video = random_video(frames=1)
    encoder = AnchorEncoder(tiny["model"], hidden_layer=-2)
    torch.testing.assert_close(encoder.encode(video)[0], reference_tokens(tiny["model"], video, layer=-2)[0],
                               rtol=1e-4, atol=1e-5)


def test_encode_accepts_a_vae_style_video(tiny):
    video = random_video(frames=5)
    vae_video = (video.permute(3, 0, 1, 2)[None] * 2 - 1)  # (1, 3, F, H, W) in [-1, 1]
    torch.testing.assert_close(tiny["encoder"].encode(vae_video, num_anchors=2, value_range=(-1, 1)),
                               tiny["encoder"].encode(video, num_anchors=2), rtol=1e-5, atol=1e-5)


def test_27x27_grid_encoder_gives_65_tokens():
    model = make_tiny_siglip(image_size=54, patch_size=2)  # the so400m grid, tiny width
    encoder = AnchorEncoder(model)
    assert encoder.patch_grid == 27
    video = random_video(frames=5)
    tokens = encoder.encode(video, num_anchors=2)
    assert tokens.shape == (1, 130, WIDTH)
    patches = encoder.patch_tokens(frames_to_nchw(video[[0, 4]]))  # (2, 729, W)
    expected = explicit_pool(patches, 27, 27).reshape(-1, WIDTH)
    torch.testing.assert_close(tokens[0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("layout", ["folder", "comfyui", "transformers"])
def test_every_layout_gives_the_same_tokens(tiny, layout):
    encoder = AnchorEncoder.from_file(tiny["files"][layout], num_attention_heads=HEADS)
    config = encoder.model.config
    assert (config.hidden_size, config.image_size, config.patch_size, config.num_hidden_layers,
            config.intermediate_size, config.layer_norm_eps) == (WIDTH, 32, 2, 2, 64, 1e-6)
    loaded = encoder.model.state_dict()
    for key, value in tiny["state_dict"].items():
        assert torch.equal(loaded[key], value), key
    video = random_video(frames=5)
    assert torch.equal(encoder.encode(video, num_anchors=2), tiny["encoder"].encode(video, num_anchors=2))


def test_full_siglip_model_file_and_folder_load_the_vision_tower(tiny, tmp_path):
    text_config = SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=50)
    config = SiglipConfig(text_config=text_config,
                          vision_config=tiny["model"].config.to_dict() | {"vision_use_head": True})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        full = SiglipModel(config).eval()
    full.vision_model.load_state_dict(tiny["state_dict"], strict=False)  # keep the tiny tower, add a head
    full.save_pretrained(str(tmp_path / "full"))
    single = tmp_path / "full.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(single))
    video = random_video(frames=1)
    expected = tiny["encoder"].encode(video)
    for path in (tmp_path / "full", single):
        encoder = AnchorEncoder.from_file(path, num_attention_heads=HEADS)
        torch.testing.assert_close(encoder.encode(video), expected, rtol=1e-6, atol=1e-6)


def test_low_precision_and_eps_options(tiny):
    encoder = AnchorEncoder.from_file(tiny["files"]["comfyui"], dtype=torch.bfloat16,
                                      num_attention_heads=HEADS, layer_norm_eps=1e-5)
    assert encoder.dtype == torch.bfloat16 and encoder.model.config.layer_norm_eps == 1e-5
    video = random_video(frames=1)
    tokens = encoder.encode(video)
    assert tokens.dtype == torch.float32
    reference = tiny["encoder"].encode(video)
    assert (tokens - reference).abs().max() < 0.05 * reference.abs().max()


def test_unpublished_width_needs_the_head_count(tiny):
    with pytest.raises(SamaInputError, match="pass num_attention_heads"):
        load_siglip_vision(tiny["files"]["comfyui"])


@pytest.mark.parametrize("keys,looks_like", [
    (["encoder.conv1.weight", "decoder.head.0.gamma"], "a Wan VAE"),
    (["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight"],
     "OpenAI-CLIP-style"),
    (["model.diffusion_model.blocks.0.self_attn.q.weight"], "Wan DiT"),
    (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "text encoder"),
])
def test_wrong_kind_of_file_is_named(tmp_path, keys, looks_like):
    path = tmp_path / "not_siglip.safetensors"
    safetensors.torch.save_file({k: torch.zeros(2) for k in keys}, str(path))
    with pytest.raises(SamaModelFileError, match=f"SigLIP vision encoder, but it looks like .*{looks_like}"):
        load_siglip_vision(path)


def test_wrong_folder_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(SamaModelFileError, match="clip_vision_model model, not SigLIP"):
        load_siglip_vision(tmp_path)
    with pytest.raises(SamaFileNotFoundError, match="sigclip_vision_patch14_384"):
        load_siglip_vision(tmp_path / "nothing.safetensors")


# --------------------------------------------------------------------------- against ComfyUI's own SigLIP

COMFY_SCRIPT = r"""
import sys, json, torch, safetensors.torch
sys.path.append(sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.ops, comfy.clip_model
from comfy.clip_vision import clip_preprocess
config = json.loads(sys.argv[4])
model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast).eval()
result = model.load_state_dict(safetensors.torch.load_file(sys.argv[2]), strict=True)
inputs = safetensors.torch.load_file(sys.argv[3])
with torch.no_grad():
    last_hidden_state = model(pixel_values=inputs["pixels"])[0]
pixels = clip_preprocess(inputs["images"], size=config["image_size"], mean=[0.5] * 3, std=[0.5] * 3,
                         crop=False)
outputs = {"last_hidden_state": last_hidden_state.contiguous(), "pixels": pixels.contiguous()}
safetensors.torch.save_file(outputs, sys.argv[3] + ".out")
"""


@pytest.mark.skipif(comfyui_dir() is None, reason="ComfyUI tree not found (set COMFYUI_DIR)")
def test_matches_comfyui_siglip(tiny, tmp_path):
    """ComfyUI's SigLIP loads our ComfyUI-layout file strictly; with layer_norm_eps=1e-5 our patch tokens
    equal its last_hidden_state, and with SigLIP's 1e-6 they differ slightly. Its preprocessing (crop off)
    differs from ours by its 8-bit quantisation only."""
    images = random_video(frames=2)
    pixels = preprocess_for_siglip(frames_to_nchw(images), 32).contiguous()
    io_path = tmp_path / "io.safetensors"
    safetensors.torch.save_file({"pixels": pixels, "images": images}, str(io_path))
    config = dict(num_channels=3, hidden_act="gelu_pytorch_tanh", hidden_size=WIDTH, image_size=32,
                  intermediate_size=64, model_type="siglip_vision_model", num_attention_heads=HEADS,
                  num_hidden_layers=2, patch_size=2)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", COMFY_SCRIPT, str(comfyui_dir()), str(tiny["files"]["comfyui"]), str(io_path),
         json.dumps(config)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = safetensors.torch.load_file(str(io_path) + ".out")
    comfy_eps = AnchorEncoder.from_file(tiny["files"]["comfyui"], num_attention_heads=HEADS,
                                        layer_norm_eps=1e-5)
    torch.testing.assert_close(comfy_eps.patch_tokens(frames_to_nchw(images)), theirs["last_hidden_state"],
                               rtol=1e-5, atol=1e-5)
    siglip_eps = tiny["encoder"].patch_tokens(frames_to_nchw(images))
    assert 0 < (siglip_eps - theirs["last_hidden_state"]).abs().max() < 1e-2
    assert (pixels - theirs["pixels"]).abs().max() <= 1 / 255 + 1e-6  # half an 8-bit level, x2 normalisation
