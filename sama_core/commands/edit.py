"""`edit`: a video (or image) + an instruction -> the edited video, headless."""

from __future__ import annotations

import argparse

from ..errors import SamaInputError


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model files")
    g.add_argument("--model", action="append", required=True, metavar="PATH",
                   help="a model bundle folder, or the DiT file(s): repeat for base shards/index then the SAMA file")
    g.add_argument("--vae", help="Wan2.1 VAE (wan_2.1_vae.safetensors / Wan2.1_VAE.pth / diffusers folder)")
    g.add_argument("--text-encoder", help="UMT5-XXL (umt5_xxl_*.safetensors / Wan .pth / HF folder)")
    g.add_argument("--tokenizer", help="tokenizer (spiece.model / folder) when the text encoder file has none")
    g.add_argument("--siglip", help="SigLIP so400m vision encoder (needed for --anchor)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="merge a LoRA (repeatable)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    r.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    r.add_argument("--attention", default="auto", help="attention backend: auto, sdpa_cudnn, sdpa_flash, math, ...")
    r.add_argument("--offload", action="store_true", help="stream DiT blocks from CPU memory (GPU only)")
    r.add_argument("--fp8", choices=["tensor", "row"], help="fp8 block linears via torch._scaled_mm (half the "
                   "memory; faster on Hopper/Ada; approximate). fp8 files are used without upcasting")
    r.add_argument("--vae-tiling", action="store_true", help="tiled VAE encode/decode (less memory)")
    r.add_argument("--sequence-parallel", action="store_true",
                   help="split the DiT's tokens across the processes of `torchrun --nproc_per_node N -m sama_core "
                        "edit ...` (one GPU each; gloo on CPU); rank 0 writes the output")
    r.add_argument("--rope", default="exact", choices=["exact", "fast"],
                   help="exact = float64 complex RoPE as released; fast = float32 real (torch.compile-friendly)")


def add_sampling_args(p: argparse.ArgumentParser):
    s = p.add_argument_group("sampling (defaults: the released SAMA inference)")
    s.add_argument("--steps", type=int, help="Euler steps (50)")
    s.add_argument("--cfg", type=float, dest="guidance", help="guidance scale (5.0)")
    s.add_argument("--shift", type=float, help="sigma shift (5.0)")
    s.add_argument("--seed", type=int, default=0, help="same seed = same edit (0)")
    s.add_argument("--denoise", type=float, help="1.0 = from noise; lower keeps more of the source")
    s.add_argument("--source-scale", type=float, dest="source_guidance", help="two-scale CFG: source scale")
    s.add_argument("--text-scale", type=float, dest="text_guidance", help="two-scale CFG: text scale")
    s.add_argument("--batch-cfg", action="store_true", help="batch the CFG passes (faster on GPUs)")
    s.add_argument("--solver", choices=["euler", "unipc"], help="euler (exact, default) or unipc (20-30 steps)")
    s.add_argument("--cache", type=float, dest="cache_threshold",
                   help="step caching threshold (approximate; 0.05 is mild, 0.15 aggressive)")
    s.add_argument("--fast", action="store_true",
                   help="fast preset: unipc 20 steps + step cache 0.05 + batched CFG (approximate)")
    flow = s.add_mutually_exclusive_group()
    flow.add_argument("--flowedit", action="store_true", default=None,
                      help="FlowEdit: start from the source and apply only what the instruction changes (keeps the "
                           "rest closer to the source; euler, no windows/anchors/cache). Default: the bundle's "
                           "(SAMA-Shapes: on where it combines with the other options)")
    flow.add_argument("--no-flowedit", action="store_false", dest="flowedit", default=None,
                      help="the released sampler even where the bundle defaults to FlowEdit")
    s.add_argument("--flowedit-skip", type=int, help="FlowEdit: first sigmas skipped (2); more keeps more of the source")
    s.add_argument("--window-frames", type=int, help="edit long videos in windows of this many frames (4k+1)")
    f = p.add_argument_group("frames")
    f.add_argument("--frames", help="frame range START:END of the source (end exclusive)")
    f.add_argument("--stride", type=int, default=1, help="take every n-th frame")
    f.add_argument("--max-frames", type=int, help="at most this many frames")
    f.add_argument("--size", help="WxH (multiples of 16); default: the reference bucket for the aspect ratio")
    f.add_argument("--resize", default="crop", choices=["crop", "letterbox", "stretch"], help="fit mode (crop)")
    f.add_argument("--no-restore", action="store_true", help="keep the bucket size instead of the source size")


def add_keep_unchanged_arg(p: argparse.ArgumentParser, help: str):
    """--keep-unchanged [T] for the commands that edit (edit, demo). Alone it means 0.2, region's
    KEEP_UNCHANGED_DEFAULT (a test holds them equal; region is not imported here, it pulls in torch)."""
    p.add_argument("--keep-unchanged", type=float, nargs="?", const=0.2, metavar="T", help=help)


def check_keep_unchanged_arg(args) -> None:
    """A bad --keep-unchanged is refused before any model loads (sama_core.region.check_keep_unchanged)."""
    if args.keep_unchanged is not None:
        from ..region import check_keep_unchanged
        check_keep_unchanged(args.keep_unchanged)


def register(sub):
    p = sub.add_parser("edit", help="edit a video or image with an instruction",
                       description="Edit a video with SAMA. Example:\n  python -m sama_core edit --model "
                                   "models/sama-bundle --video in.mp4 --prompt 'make the car red' --out out.mp4",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--video", required=True, help="source video (mp4, mov, ...) or image")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--negative", help="negative prompt (default: '[Video edit]')")
    p.add_argument("--no-prefix", action="store_true", help="do not prepend '[Video edit] ' to the prompt")
    p.add_argument("--out", required=True, help="output .mp4 (or .png for an image)")
    p.add_argument("--anchor", help="an edited anchor frame (image) steering the edit; needs --siglip")
    p.add_argument("--anchor-strength", type=float, help="fraction of steps the anchor steers (0.5)")
    p.add_argument("--mask", help="image or video of the source's size (or of its aspect ratio: scaled): white "
                                  "where the edit may change the video; everything else stays the source")
    add_keep_unchanged_arg(p, "pixels the edit changed by less than T/2 (0-1 scale, against the source's VAE round "
                              "trip) are the source's own, blended up to T (alone: 0.2; 0: off). Default: the "
                              "bundle's (SAMA-Shapes: 0.2; otherwise off). For local edits; leave it off for a "
                              "global change (a style, the lighting)")
    p.add_argument("--compare", action="store_true", help="also write a side-by-side source | edit video")
    add_sampling_args(p)
    p.set_defaults(func=run)


def parse_size(text):
    if not text:
        return None, None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise SamaInputError(f"--size must look like 832x480, got '{text}'") from None


def parse_range(text):
    if not text:
        return None
    try:
        start, end = text.split(":")
        return int(start or 0), (int(end) if end else None)
    except ValueError:
        raise SamaInputError(f"--frames must look like START:END (e.g. 0:81), got '{text}'") from None


def parse_lora(spec: str):
    path, _, strength = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        return (path or spec), float(strength or 1)
    except ValueError:
        return spec, 1.0


def build_pipeline(args):
    import torch

    from ..pipeline import SamaPipeline
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    common = dict(device=device, dtype=dtype, attention_backend=args.attention, offload=args.offload,
                  fp8=args.fp8, rope=args.rope,
                  vae_tiling=args.vae_tiling, loras=[parse_lora(s) for s in args.lora])
    models = args.model
    from pathlib import Path
    if len(models) == 1 and Path(models[0]).is_dir() and (Path(models[0]) / "bundle.json").exists():
        return SamaPipeline.from_bundle(models[0], vae=args.vae, text_encoder=args.text_encoder,
                                        tokenizer=args.tokenizer, siglip=args.siglip, **common)
    if not args.vae or not args.text_encoder:
        raise SamaInputError("--vae and --text-encoder are needed unless --model is a bundle folder")
    return SamaPipeline.from_paths(models, args.vae, args.text_encoder, tokenizer=args.tokenizer,
                                   siglip=args.siglip, **common)


def settings_from(args, **extra):
    from ..pipeline import EditSettings
    width, height = parse_size(args.size)
    return EditSettings(width=width, height=height, resize_mode=args.resize, restore_size=not args.no_restore,
                        frame_range=parse_range(args.frames), stride=args.stride, max_frames=args.max_frames,
                        **extra)


def chosen_options(args, **extra) -> dict:
    """The sampling options the command line sets (the fast preset under them); the rest come from the model's
    defaults (SamaPipeline.sampler_options)."""
    window = (args.window_frames - 1) // 4 + 1 if args.window_frames else None
    from ..sampler import FAST_PRESET
    preset = FAST_PRESET if args.fast else {}
    chosen = dict(steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed, denoise=args.denoise,
                  source_guidance=args.source_guidance, text_guidance=args.text_guidance,
                  batch_cfg=args.batch_cfg or None, solver=args.solver, cache_threshold=args.cache_threshold,
                  window_latent_frames=window, flowedit=args.flowedit, flowedit_skip=args.flowedit_skip,
                  **extra)
    return {**preset, **{k: v for k, v in chosen.items() if v is not None}}


def check_sampling_args(args, **extra) -> None:
    """Sampling options no edit can use are refused before any model loads (a 14B load takes minutes): the
    checks of SamplerOptions and of the sigmas, on the values given here."""
    from ..sampler import SamplerOptions
    from ..scheduler import flow_sigmas
    options = SamplerOptions(**chosen_options(args, **extra))
    flow_sigmas(options.steps, options.shift, options.denoise)
    if args.window_frames is not None:
        least = 4 * options.window_overlap + 1  # windows overlap by window_overlap latent frames
        if args.window_frames < least:
            raise SamaInputError(f"--window-frames must be at least {least} (windows overlap by "
                                 f"{4 * options.window_overlap} frames), got {args.window_frames}; e.g. 33 or 81")


def check_output_arg(args) -> None:
    """An --out the writers cannot honour (.txt, .webm, no extension) is refused before any model loads, not
    after the edit (sama_core.video.check_output_path; an image --out for a video is caught once it is read)."""
    from ..video import check_output_path
    check_output_path(args.out)


def options_from(pipe, args, **extra):
    options = pipe.sampler_options(**chosen_options(args, **extra))
    if args.flowedit_skip is not None and args.flowedit_skip >= options.steps:
        # with flowedit "auto" the edit would quietly fall back to the released sampler instead
        raise SamaInputError(f"--flowedit-skip {args.flowedit_skip} skips all of the {options.steps} steps: skip "
                             "fewer (the default is 2) or give more --steps")
    return options


def progress_bar():
    """A tqdm bar created at the first finished step (so failures before sampling print no empty bar)."""
    from tqdm import tqdm
    state = {}

    def on_step(info):
        if "bar" not in state:
            state["bar"] = tqdm(total=info.total, unit="step", desc="editing")
        state["bar"].update(1)
        if info.step + 1 == info.total:
            state["bar"].close()
    return on_step


def start_sequence_parallel(args):
    """Join the torchrun process group; each process takes its own GPU. Returns the SequenceParallel."""
    import os

    import torch
    import torch.distributed as dist

    from ..parallel import SequenceParallel
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SamaInputError("--sequence-parallel needs several processes: launch with `torchrun "
                             "--nproc_per_node N -m sama_core edit ... --sequence-parallel` (N GPUs)")
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)
    else:
        args.device = "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    return SequenceParallel.from_world(device_type="cuda" if cuda else "cpu")


def run(args) -> int:
    sp = start_sequence_parallel(args) if args.sequence_parallel else None
    completed = False
    try:
        code = _edit(args, sp)
        completed = True
        return code
    finally:
        if sp is not None:
            from ..parallel import close_process_group
            close_process_group(completed)


def _edit(args, sp) -> int:
    check_keep_unchanged_arg(args)
    check_sampling_args(args, anchor_strength=args.anchor_strength)
    check_output_arg(args)
    pipe = build_pipeline(args)
    writer = sp is None or sp.rank == 0  # every process runs the same edit (same seed, shapes); one writes it
    out = args.out
    if sp is not None:
        from ..parallel import enable_sequence_parallel
        enable_sequence_parallel(pipe.dit, sp)
    if not writer:
        import tempfile
        from pathlib import Path
        out = Path(tempfile.mkdtemp(prefix="sama-sp-")) / Path(args.out).name
    settings = settings_from(args, negative=args.negative, use_prefix=not args.no_prefix,
                             anchor_image=args.anchor, mask=args.mask, keep_unchanged=args.keep_unchanged)
    options = options_from(pipe, args, anchor_strength=args.anchor_strength)
    result = pipe.edit_file(args.video, args.prompt, out, settings, options, compare=args.compare and writer,
                            callback=progress_bar() if writer else None)
    if not writer:
        import shutil
        shutil.rmtree(out.parent, ignore_errors=True)
        return 0
    print(f"wrote {result.output} ({result.frames.shape[0]} frames, {result.frames.shape[2]}x"
          f"{result.frames.shape[1]}, {float(result.fps):g} fps)")
    if result.comparison:
        print(f"comparison: {result.comparison}")
    return 0
