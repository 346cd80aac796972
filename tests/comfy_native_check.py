"""Run inside a fresh process (tests/test_comfy_native.py starts it): loads ComfyUI's modules from
COMFYUI_DIR and this pack as the package `sama_pack`, then compares native ComfyUI sampling of a
tiny SAMA model (through SAMA In-Context's packed latent) with sama_core's reference loop, starting
from the same initial noise. Prints one JSON line of measurements."""

import importlib.util
import json
import os
import pathlib
import sys
import tempfile

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
COMFY = pathlib.Path(os.environ["COMFYUI_DIR"])
sys.path[:0] = [str(COMFY), str(REPO / "tests")]

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
spec = importlib.util.spec_from_file_location("sama_pack", REPO / "__init__.py",
                                              submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(spec)
sys.modules["sama_pack"] = pack
spec.loader.exec_module(pack)

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from sama_pack.nodes.comfy_model import DirectSama, load_sama_patcher, sama_diffusion_model  # noqa: E402
from sama_pack.nodes.packing import pack as pack_tokens, unpack  # noqa: E402
from sama_pack.sama_core.config import SamaConfig  # noqa: E402
from sama_pack.sama_core.loading import save_dit  # noqa: E402
from sama_pack.sama_core.model import SamaDiT  # noqa: E402
from sama_pack.sama_core.sampler import SamplerOptions, sample  # noqa: E402
from sama_pack.sama_core.scheduler import anchor_sigma_cut  # noqa: E402


def main():
    torch.manual_seed(0)
    cfg = SamaConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, text_dim=24, freq_dim=32,
                     siglip_dim=48, siglip_hidden_dim=40)
    model = SamaDiT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = pathlib.Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save_dit(model, path)
    patcher = load_sama_patcher([str(path)])
    dit = sama_diffusion_model(patcher)
    base = patcher.model

    steps, cfg_scale, n_tok = 5, 4.0, 10
    raw_source = torch.randn(1, 16, 2, 4, 4, generator=g)
    cond = torch.randn(1, 5, 24, generator=g)
    uncond = torch.randn(1, 3, 24, generator=g)
    anchor = torch.randn(1, n_tok, 48, generator=g)
    results = {}
    for use_anchor in (False, True):
        opts = SamplerOptions(steps=steps, guidance=cfg_scale, num_semantic_tokens=n_tok, seed=3,
                              anchor_strength=0.5 if use_anchor else 0.0)
        source = base.process_latent_in(raw_source)
        with torch.no_grad():
            ref = sample(DirectSama(dit), cond, uncond, source=source, options=opts,
                         anchor_tokens=anchor if use_anchor else None)
        # Native: the same initial noise, laid out as the packed latent.
        from sama_pack.sama_core.sampler import initial_noise
        video_noise, sem_noise = initial_noise(source.shape, (1, n_tok, 48), 3)
        noise = pack_tokens(video_noise, sem_noise)
        mean = comfy.latent_formats.Wan21().latents_mean.reshape(-1)
        latent_image = pack_tokens(raw_source, torch.zeros(1, n_tok, 48), fill=mean)
        extra = {"sama_source": raw_source, "sama_layout": (2, n_tok)}
        if use_anchor:
            extra.update(sama_anchor=anchor, sama_anchor_sigma=anchor_sigma_cut(0.5, 5.0))
        positive = [[cond, dict(extra)]]
        negative = [[uncond, dict(extra)]]
        out = comfy.sample.sample(patcher, noise, steps, cfg_scale, "euler", "simple", positive, negative,
                                  latent_image, denoise=1.0, seed=3)
        native = base.process_latent_in(out)  # comfy returns raw latents; compare in the model's space
        video, tokens = unpack(native, 2, n_tok, 48)
        key = "anchor" if use_anchor else "plain"
        results[key] = {
            "video_max_abs_diff": float((video - ref.latents).abs().max()),
            "semantic_max_abs_diff": float((tokens - ref.semantic).abs().max()),
            "video_max_abs": float(ref.latents.abs().max()),
        }
    from sama_pack.sama_core.scheduler import flow_sigmas
    # ComfyUI's "simple" scheduler picks from a 1000-entry table: exact when steps divides 1000.
    results["sigma_max_abs_diff"] = {
        n: float((comfy.samplers.calculate_sigmas(base.model_sampling, "simple", n).float() - flow_sigmas(n))
                 .abs().max()) for n in (5, 6, 20, 25, 50)}
    results["vae"] = vae_widths_check()
    print(json.dumps(results))


def vae_widths_check() -> dict:
    """SAMA Load VAE's loader on tiny Wan2.1 VAE files (one with a decoder wider than its encoder, as
    `train.vae_train` trainable: decoder writes): decode through ComfyUI's VAE object vs sama_core's."""
    from diffusers import AutoencoderKLWan

    from sama_pack.nodes.model import load_wan_vae_any_width
    from sama_pack.sama_core.vae import WanVAE, save_original_layout
    out = {}
    for name, decoder_base_dim in (("same", None), ("wide_decoder", 8)):
        torch.manual_seed(1)
        model = AutoencoderKLWan(base_dim=4, decoder_base_dim=decoder_base_dim, z_dim=16)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = pathlib.Path(tempfile.mkdtemp()) / f"vae_{name}.safetensors"
        save_original_layout(model, path)
        latent = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))  # raw (ComfyUI) latents
        comfy_vae = load_wan_vae_any_width(str(path))
        frames = comfy_vae.decode(latent).float().reshape(-1, 32, 32, 3)  # (F, H, W, 3) in [0, 1]
        ours = WanVAE.from_file(path).decode(latent, normalized=False)  # (1, 3, F, H, W) in [-1, 1]
        ours = ((ours[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
        out[name] = {"frames": list(frames.shape), "max_abs_diff": float((frames - ours).abs().max()),
                     "decoder_width": int(comfy_vae.first_stage_model.decoder.dim)}
    return out


if __name__ == "__main__":
    main()
