"""sama_core.vae: Wan2.1 VAE loading (original/ComfyUI single file, .pth, diffusers folder), latent
normalisation, encode/decode shapes, tiling, slicing, dtypes and errors, on a tiny random Wan VAE.

The original/ComfyUI key layout is written by the test itself: `original_layout_key_names` lists the
module names of Wan2.1's own VAE (wan/modules/vae.py: encoder.downsamples.N, decoder.upsamples.N, ...),
and diffusers' converter applied to those *names* gives the name mapping, whose inverse writes the tiny
diffusers model in the original layout. When ComfyUI is present, a subprocess checks that ComfyUI's own
WanVAE has exactly these keys/shapes and computes the same encode/decode.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import safetensors.torch
import torch
from conftest import comfyui_dir
from diffusers import AutoencoderKLWan

from sama_core.errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError
from sama_core.vae import (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAETiling, WanVAE, denormalize_latents,
                           load_wan_vae, normalize_latents, to_original_layout)

BASE_DIM = 8


def make_tiny_vae(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoencoderKLWan(base_dim=BASE_DIM, z_dim=16).eval()
    # Perturb every tensor (norm gammas start at exactly 1) so a mis-mapped key cannot go unnoticed.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def random_frames(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    model = make_tiny_vae()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = to_original_layout(sd, BASE_DIM)
    files = {
        "comfyui": root / "wan_2.1_vae.safetensors",
        "pth": root / "Wan2.1_VAE.pth",
        "diffusers": root / "diffusers_vae",
    }
    safetensors.torch.save_file(original, str(files["comfyui"]))
    torch.save(original, str(files["pth"]))
    model.save_pretrained(str(files["diffusers"]))
    return {"model": model, "state_dict": sd, "original": original, "files": files,
            "vae": WanVAE.from_file(files["comfyui"])}


# ------------------------------------------------------------------------------------------ normalisation

def test_latent_constants_match_diffusers_wan21_defaults():
    config = AutoencoderKLWan(base_dim=8).config  # diffusers' defaults are the Wan2.1 statistics
    assert list(WAN21_LATENTS_MEAN) == list(config.latents_mean)
    assert list(WAN21_LATENTS_STD) == list(config.latents_std)
    assert len(WAN21_LATENTS_MEAN) == len(WAN21_LATENTS_STD) == 16


def test_normalize_is_per_channel_mean_std():
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 16, 3, 4, 5, generator=g) * 3
    normalized = normalize_latents(raw)
    for c in range(16):
        expected = (raw[:, c] - WAN21_LATENTS_MEAN[c]) / WAN21_LATENTS_STD[c]
        torch.testing.assert_close(normalized[:, c], expected, rtol=1e-6, atol=1e-6)


def test_normalize_denormalize_round_trip():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 2, 3, 3, generator=g) * 4
    torch.testing.assert_close(denormalize_latents(normalize_latents(x)), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normalize_latents(denormalize_latents(x)), x, rtol=1e-6, atol=1e-6)
    assert normalize_latents(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_normalize_rejects_wrong_channel_count():
    with pytest.raises(SamaInputError, match=r"\(B, 16, T"):
        normalize_latents(torch.zeros(1, 4, 1, 2, 2))


# ------------------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("layout", ["comfyui", "pth", "diffusers"])
def test_every_layout_loads_the_exact_weights(tiny, layout):
    model = load_wan_vae(tiny["files"][layout])
    assert model.config.base_dim == BASE_DIM and model.config.z_dim == 16
    assert list(model.config.temperal_downsample) == [False, True, True]
    loaded = model.state_dict()
    assert set(loaded) == set(tiny["state_dict"])
    for key, value in tiny["state_dict"].items():
        assert torch.equal(loaded[key], value), key


def test_layouts_give_identical_latents_and_frames(tiny):
    frames = random_frames((1, 3, 5, 16, 16))
    outputs = []
    for layout in ("comfyui", "pth", "diffusers"):
        vae = WanVAE.from_file(tiny["files"][layout])
        latents = vae.encode(frames)
        outputs.append((latents, vae.decode(latents)))
    for latents, decoded in outputs[1:]:
        assert torch.equal(latents, outputs[0][0])
        assert torch.equal(decoded, outputs[0][1])


def test_pipeline_folder_with_vae_subfolder_loads(tiny, tmp_path):
    pipeline = tmp_path / "Wan2.1-T2V-diffusers"
    tiny["model"].save_pretrained(str(pipeline / "vae"))
    assert load_wan_vae(pipeline).config.base_dim == BASE_DIM


# ----------------------------------------------------------------------------------------- encode/decode

@pytest.mark.parametrize("num_frames", [1, 5, 9])
def test_encode_decode_shapes_and_conventions(tiny, num_frames):
    vae = tiny["vae"]
    frames = random_frames((2, 3, num_frames, 16, 24), seed=num_frames)
    latents = vae.encode(frames)
    assert latents.shape == (2, 16, 1 + (num_frames - 1) // 4, 2, 3)
    assert latents.dtype == torch.float32
    assert vae.latent_shape(2, num_frames, 16, 24) == tuple(latents.shape)

    raw = vae.encode(frames, normalized=False)
    with torch.no_grad():
        posterior_mean = tiny["model"].encode(frames).latent_dist.mean  # diffusers directly
    torch.testing.assert_close(raw, posterior_mean, rtol=0, atol=0)
    torch.testing.assert_close(latents, normalize_latents(raw), rtol=0, atol=0)

    decoded = vae.decode(latents)
    assert decoded.shape == (2, 3, num_frames, 16, 24)
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        expected = tiny["model"].decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(raw, normalized=False), expected, rtol=0, atol=0)
    # normalize -> denormalize costs float32 rounding (~1e-7 relative) before decoding
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)


def test_slicing_gives_the_batched_result(tiny):
    vae = WanVAE(tiny["model"], slicing=True)
    frames = random_frames((3, 3, 5, 16, 16), seed=7)
    sliced = vae.encode(frames)
    sliced_frames = vae.decode(sliced)
    vae.set_slicing(False)
    torch.testing.assert_close(sliced, vae.encode(frames), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced_frames, vae.decode(sliced), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- tiling

def test_tiled_decode_without_overlap_is_the_per_tile_decodes(tiny):
    """32 px tiles with a 32 px stride on 64 px frames: the result must be the four independently decoded
    4x4-latent tiles put side by side (no blending)."""
    vae = WanVAE(tiny["model"], tiling=VAETiling(32, 32, 32, 32))
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    tiled = vae.decode(latents)
    vae.set_tiling(None)
    expected = torch.zeros(1, 3, 5, 64, 64)
    for i in range(2):
        for j in range(2):
            tile = latents[..., 4 * i:4 * i + 4, 4 * j:4 * j + 4]
            expected[..., 32 * i:32 * i + 32, 32 * j:32 * j + 32] = vae.decode(tile)
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-5)
    assert (tiled - vae.decode(latents)).abs().max() > 1e-3  # tiling really was applied


def spatially_local_copy(model):
    """A copy whose convolutions only use their spatial centre tap and whose middle attention adds nothing:
    every output pixel then depends on its own location only, so correctly placed and blended tiles must
    reproduce the untiled result. (Random weights have no locality: with full kernels, 32 px tiles differ
    from untiled decoding by ~0.13 mean abs on this model; trained VAEs are local, random ones are not.)"""
    local = AutoencoderKLWan.from_config(model.config).eval()
    local.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in local.named_parameters():
            if name.endswith("weight") and p.ndim >= 4 and p.shape[-1] == 3:
                centre = p[..., 1:2, 1:2].clone()
                p.zero_()
                p[..., 1:2, 1:2] = centre
            if "attentions" in name and "proj" in name:
                p.zero_()
    return local


def test_tiled_matches_untiled_on_a_spatially_local_vae(tiny):
    """Tolerance 1e-5: 32 px tiles with 16 px overlap on 64 px frames, encode and decode."""
    vae = WanVAE(spatially_local_copy(tiny["model"]))
    frames = random_frames((1, 3, 5, 64, 64), seed=6)
    latents = vae.encode(frames)
    decoded = vae.decode(latents)
    vae.set_tiling(VAETiling(tile_height=32, tile_width=32, stride_height=16, stride_width=16))
    model = vae.model
    with mock.patch.object(model, "tiled_encode", wraps=model.tiled_encode) as tiled_encode, \
            mock.patch.object(model, "tiled_decode", wraps=model.tiled_decode) as tiled_decode:
        torch.testing.assert_close(vae.encode(frames), latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(latents), decoded, rtol=1e-5, atol=1e-5)
    assert tiled_encode.call_count == 1 and tiled_decode.call_count == 1  # the tiled paths really ran


def test_tiling_options_are_validated(tiny):
    with pytest.raises(SamaInputError, match="multiples of 8"):
        WanVAE(tiny["model"], tiling=VAETiling(tile_height=30))
    with pytest.raises(SamaInputError, match="stride"):
        WanVAE(tiny["model"], tiling=VAETiling(tile_height=32, stride_height=64))
    vae = WanVAE(tiny["model"], tiling=True)
    assert vae.tiling == VAETiling() and tiny["model"].use_tiling
    vae.set_tiling(False)
    assert not tiny["model"].use_tiling


# ------------------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_low_precision_matches_float32(tiny, dtype, tolerance):
    vae = WanVAE.from_file(tiny["files"]["comfyui"], dtype=dtype)
    assert vae.dtype == dtype
    frames = random_frames((1, 3, 5, 16, 16), seed=8)
    latents = vae.encode(frames)
    decoded = vae.decode(latents)
    assert latents.dtype == decoded.dtype == torch.float32
    reference = tiny["vae"].encode(frames)
    assert (latents - reference).abs().max() < tolerance * reference.abs().max()
    assert (decoded - tiny["vae"].decode(reference)).abs().mean() < tolerance


# ------------------------------------------------------------------------------------------------- errors

def test_frame_count_must_be_one_plus_4k(tiny):
    with pytest.raises(SamaInputError, match=r"4 frames.*1 \+ 4k.*up to 5 frames.*trim to 1 frames"):
        tiny["vae"].encode(random_frames((1, 3, 4, 16, 16)))


def test_frame_size_must_be_multiple_of_8(tiny):
    with pytest.raises(SamaInputError, match=r"12x16 \(HxW\).*multiples of 8.*16 for the SAMA DiT"):
        tiny["vae"].encode(random_frames((1, 3, 1, 12, 16)))


def test_frame_layout_range_and_dtype_are_checked(tiny):
    with pytest.raises(SamaInputError, match=r"\(B, 3, F, H, W\)"):
        tiny["vae"].encode(torch.zeros(5, 16, 16, 3))
    with pytest.raises(SamaInputError, match=r"\[-1, 1\].*x / 127.5 - 1"):
        tiny["vae"].encode(random_frames((1, 3, 1, 16, 16)) * 127.5 + 127.5)
    with pytest.raises(SamaInputError, match="uint8"):
        tiny["vae"].encode(torch.zeros(1, 3, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(SamaInputError, match=r"\(B, 16, T"):
        tiny["vae"].decode(torch.zeros(1, 4, 1, 2, 2))


@pytest.mark.parametrize("keys,looks_like", [
    (["model.diffusion_model.blocks.0.self_attn.q.weight", "model.diffusion_model.head.head.weight"],
     "Wan DiT"),
    (["blocks.0.self_attn.q.weight", "siglip_feat_mlp.0.weight"], "SAMA DiT"),
    (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "text encoder"),
    (["vision_model.embeddings.patch_embedding.weight"], "vision encoder"),
    (["first_stage_model.encoder.down.0.block.0.conv1.weight"], "image VAE"),
    (["foo.bar"], "unrecognised"),
])
def test_wrong_kind_of_file_is_named(tmp_path, keys, looks_like):
    path = tmp_path / "not_a_vae.safetensors"
    safetensors.torch.save_file({k: torch.zeros(2) for k in keys}, str(path))
    with pytest.raises(SamaModelFileError, match=f"as the Wan2.1 VAE, but it looks like .*{looks_like}"):
        load_wan_vae(path)


def test_diffusers_weights_without_config_are_refused_with_advice(tiny, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(tiny["state_dict"], str(path))
    with pytest.raises(SamaModelFileError, match="config.json"):
        load_wan_vae(path)


def test_folder_of_another_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(SamaModelFileError, match="WanTransformer3DModel model, not a Wan VAE"):
        load_wan_vae(tmp_path)


def test_missing_file_is_reported():
    with pytest.raises(SamaFileNotFoundError, match="wan_2.1_vae.safetensors"):
        load_wan_vae("/nonexistent/wan_vae.safetensors")


class NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"encoder.conv1.weight": NotATensor()}, str(path))
    with pytest.raises(SamaModelFileError, match="weights_only=True"):
        load_wan_vae(path)


def renumbered(sd, prefix, insert_copy_of):
    """The state dict with an extra copy of block `insert_copy_of` of the Sequential at `prefix`
    (later blocks shift by one): a layout with one more residual block in that level."""
    out = {}
    for key, value in sd.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            index = int(index)
            if index == insert_copy_of:
                out[f"{prefix}{index}.{rest}"] = value.clone()
            out[f"{prefix}{index + 1 if index >= insert_copy_of else index}.{rest}"] = value
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("mutation,message", [
    ("dim_mult", r"dim_mult=\[1, 2, 2, 4\]"),
    ("num_res_blocks", r"num_res_blocks=\[2, 3\]"),
    ("wan22", "Wan2.2 VAE"),
    ("z_dim", "4 latent channels"),
])
def test_layouts_the_converter_cannot_map_are_refused(tiny, tmp_path, mutation, message):
    sd = dict(tiny["original"])
    if mutation == "dim_mult":  # level 2 at twice the base width instead of four times
        sd["encoder.downsamples.7.residual.6.weight"] = torch.zeros(2 * BASE_DIM, 1, 1, 1, 1)
    elif mutation == "num_res_blocks":  # three residual blocks in the first level
        sd = renumbered(sd, "encoder.downsamples.", insert_copy_of=1)
    elif mutation == "wan22":
        sd["encoder.conv1.weight"] = torch.zeros(BASE_DIM, 12, 3, 3, 3)
    elif mutation == "z_dim":
        sd["conv2.weight"] = torch.zeros(4, 4, 1, 1, 1)
    path = tmp_path / "odd_vae.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with pytest.raises(SamaModelFileError, match=message):
        load_wan_vae(path)


# ---------------------------------------------------------------------------- against ComfyUI's own WanVAE

COMFY_SCRIPT = r"""
import sys, torch, safetensors.torch
sys.path.append(sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.ldm.wan.vae import WanVAE
sd = safetensors.torch.load_file(sys.argv[2])
model = WanVAE(dim=int(sys.argv[4]), z_dim=16, temperal_downsample=[False, True, True]).eval()
ours = {k: tuple(v.shape) for k, v in sd.items()}
theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
assert ours == theirs, (sorted(set(ours) ^ set(theirs))[:10],
                       [k for k in ours if ours[k] != theirs.get(k)][:10])
model.load_state_dict(sd, strict=True)
inputs = safetensors.torch.load_file(sys.argv[3])
with torch.no_grad():
    mu = model.encode(inputs["frames"])
    frames = model.decode(inputs["latents"])
safetensors.torch.save_file({"mu": mu.contiguous(), "frames": frames.contiguous()}, sys.argv[3] + ".out")
"""


@pytest.mark.skipif(comfyui_dir() is None, reason="ComfyUI tree not found (set COMFYUI_DIR)")
def test_matches_comfyui_wanvae(tiny, tmp_path):
    """ComfyUI's WanVAE has exactly our original-layout keys and shapes, and computes the same raw latents
    (its encode returns mu) and frames (it does not clamp, we do)."""
    frames = random_frames((1, 3, 5, 16, 16), seed=9)
    g = torch.Generator().manual_seed(10)
    raw_latents = torch.randn(1, 16, 3, 2, 2, generator=g)
    io_path = tmp_path / "io.safetensors"
    safetensors.torch.save_file({"frames": frames, "latents": raw_latents}, str(io_path))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", COMFY_SCRIPT, str(comfyui_dir()), str(tiny["files"]["comfyui"]), str(io_path),
         str(BASE_DIM)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = safetensors.torch.load_file(str(io_path) + ".out")
    vae = tiny["vae"]
    torch.testing.assert_close(vae.encode(frames, normalized=False), theirs["mu"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(raw_latents, normalized=False), theirs["frames"].clamp(-1, 1),
                               rtol=1e-5, atol=1e-5)


def test_incomplete_vae_file_is_reported(tmp_path):
    path = tmp_path / "partial_vae.safetensors"
    safetensors.torch.save_file({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3),
                                 "decoder.head.0.gamma": torch.zeros(8, 1, 1, 1)}, str(path))
    with pytest.raises(SamaModelFileError, match="incomplete Wan VAE file"):
        load_wan_vae(path)
