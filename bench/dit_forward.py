"""DiT forward throughput: ours vs a straightforward eager re-implementation, same device, one run.

    python bench/dit_forward.py                 # CPU: tiny and medium configs
    python bench/dit_forward.py --gpu-14b       # GPU: one 14B-shaped block at the 480x832x81 edit length

Reports tokens/s and the ratio ours / eager (>1 = ours faster). On a GPU it also reports the effective
TFLOP/s of one 14B block at 65,585 tokens (source 32,760 + 65 semantic + target 32,760) in bf16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reference_wan import reference_wan_t2v  # noqa: E402  (the independent eager implementation)
from sama_core.config import PRESETS, SamaConfig  # noqa: E402
from sama_core.model import SamaDiT  # noqa: E402


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def compare(name: str, cfg: SamaConfig, frames: int, size: int, repeats: int, device: str):
    torch.manual_seed(0)
    model = SamaDiT(cfg).to(device).eval()
    sd = model.state_dict()
    x = torch.randn(1, 16, frames, size, size, device=device)
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, 512, cfg.text_dim, device=device)
    tokens = frames * (size // 2) ** 2
    with torch.no_grad():
        ours = timeit(lambda: model(x, t, ctx), repeats)
        eager = timeit(lambda: reference_wan_t2v(sd, cfg, x, t, ctx, segment_bias=sd["segment_embedding.weight"][2]),
                       repeats)
    print(f"{name:8s} {tokens:6d} tokens | ours {tokens / ours:10.0f} tok/s | eager {tokens / eager:10.0f} tok/s "
          f"| ours/eager speed {eager / ours:5.2f}x")


def block_flops(dim: int, ffn: int, seq: int, ctx: int = 512) -> float:
    self_attn = 4 * 2 * seq * dim * dim + 2 * 2 * seq * seq * dim
    cross = 2 * 2 * seq * dim * dim + 2 * 2 * ctx * dim * dim + 2 * 2 * seq * ctx * dim
    return self_attn + cross + 2 * 2 * seq * dim * ffn


def gpu_14b_block(repeats: int, backend: str):
    from sama_core.rope import sequence_frequencies
    cfg = PRESETS["14B"]
    cfg1 = SamaConfig(**{**cfg.to_dict(), "num_layers": 1})
    model = SamaDiT(cfg1, attention_backend=backend, device="cuda", dtype=torch.bfloat16).eval()
    grid = (21, 30, 52)  # 81 frames -> 21 latent frames; 480x832 -> 60x104 latents -> 30x52 tokens
    seq = 2 * 21 * 30 * 52 + 65
    x = torch.randn(1, seq, cfg.dim, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, cfg.dim, device="cuda", dtype=torch.bfloat16)
    t_mod = torch.randn(1, 6, cfg.dim, device="cuda", dtype=torch.bfloat16)
    freqs = sequence_frequencies(cfg.head_dim, grid, 65, grid, "cuda")
    with torch.no_grad():
        sec = timeit(lambda: model.blocks[0](x, ctx, t_mod, freqs), repeats)
    tflops = block_flops(cfg.dim, cfg.ffn_dim, seq) / sec / 1e12
    print(f"14B block, {seq} tokens, bf16, attention '{backend}': {sec * 1000:.1f} ms, {tflops:.0f} TFLOP/s effective")
    from sama_core.fp8 import convert_block_linears
    convert_block_linears(model, "tensor")
    with torch.no_grad():
        sec8 = timeit(lambda: model.blocks[0](x, ctx, t_mod, freqs), repeats)
    print(f"14B block with fp8 linears (_scaled_mm): {sec8 * 1000:.1f} ms, {sec / sec8:.2f}x the bf16 block")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-14b", action="store_true")
    p.add_argument("--backend", default="sdpa_cudnn")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if args.gpu_14b:  # first: the number a GPU session comes for
        if device != "cuda":
            sys.exit("--gpu-14b needs a CUDA GPU")
        gpu_14b_block(args.repeats, args.backend)
    compare("tiny", PRESETS["tiny"], frames=3, size=16, repeats=args.repeats, device=device)
    medium = SamaConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=4, text_dim=256, freq_dim=256)
    compare("medium", medium, frames=5, size=32, repeats=args.repeats, device=device)


if __name__ == "__main__":
    main()
