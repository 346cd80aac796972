"""The text probe: does a DiT use the instruction where an edit changes the video?

    python -m train.probe --dit RUN/stage1/final/sama_dit.safetensors --cache RUN/cache/stage1 [--limit 24]
    python -m train.probe --dit RUN/stage1/final/sama_dit.safetensors --checkpoint RUN/stage1/checkpoint-5000 ...

On the first `limit` small edits of a feature cache (the share of changed latent positions between
`min_changed` and `max_changed`; a position is changed where the channel mean of |target - source| exceeds
`threshold`), the target is noised to each sigma and one model call gives x0 = x_sigma - sigma * v. Inside
the changed region it reports the mean squared error of that x0 with each sample's own prompt
(`error`), with the prompts rotated by one sample (`error_wrong_prompt`), of copying the source
(`copy_error`), and the mean squared difference between the two predictions (`text_effect`); outside the
changed region, the error with the own prompt (`error_outside`: how well the model keeps what the edit
leaves alone; copying the source there costs only the sub-threshold changes, `copy_error_outside`). A model
that ignores the text has a text effect of 0 and equal errors; one that edits has an error below the
copy's. The eval (train/eval.py) judges whole sampled edits; this isolates the text pathway in one call,
which is how session 4 found that the SAMA-Shapes DiT ignored the instruction (docs/sama_shapes.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from sama_core.errors import SamaError, SamaInputError
from sama_core.scheduler import add_noise, timesteps_of

from .cache import CachedFeatureDataset
from .checkpoint import load_dit_with_ema
from .data import RAW_VIDEO, BatchItem
from .features import pad_rows


@dataclasses.dataclass
class ProbeSamples:
    target: torch.Tensor              # (B, 16, T, h, w) clean latents
    source: torch.Tensor              # (B, 16, T, h, w)
    rows: list                        # [(L_i, text_dim)] prompt rows of each sample
    semantic: Optional[torch.Tensor]  # (B, N, siglip_dim) or None
    changed: torch.Tensor             # (B, 1, T, h, w) float: 1 where the edit changes the latents
    ids: list


def changed_positions(target: torch.Tensor, source: torch.Tensor, threshold: float) -> torch.Tensor:
    """(..., C, T, h, w) pair -> (..., 1, T, h, w) float mask of the positions the edit changes."""
    return ((target - source).abs().mean(-4, keepdim=True) > threshold).float()


def small_edits(cache_dir, limit: int = 24, min_changed: float = 0.003, max_changed: float = 0.06,
                threshold: float = 0.25) -> ProbeSamples:
    """The first `limit` edits of the cache whose changed share lies in [min_changed, max_changed], all of
    the first such edit's latent shape (so that they form one batch)."""
    dataset = CachedFeatureDataset(cache_dir)
    picked, seen, shape = [], set(), None
    for index, meta in enumerate(dataset.samples):
        if meta["kind"] == RAW_VIDEO or meta["id"] in seen:
            continue
        seen.add(meta["id"])
        item = dataset[BatchItem(index, "-", 0)]
        if item["source"] is None or item["source"].shape != item["target"].shape:
            continue
        if shape is not None and item["target"].shape != shape:
            continue
        share = changed_positions(item["target"], item["source"], threshold).mean().item()
        if min_changed <= share <= max_changed:
            shape = item["target"].shape
            picked.append(item)
        if len(picked) == limit:
            break
    if len(picked) < 2:
        raise SamaInputError(f"{cache_dir} has {len(picked)} edit(s) that change between {min_changed:.1%} and "
                             f"{max_changed:.1%} of the latent positions; the probe needs at least 2 (it swaps "
                             "their prompts): widen --min-changed/--max-changed or use a cache with edits")
    target = torch.stack([it["target"] for it in picked])
    source = torch.stack([it["source"] for it in picked])
    semantic = picked[0]["semantic"]
    return ProbeSamples(target, source, [it["text"] for it in picked],
                        torch.stack([it["semantic"] for it in picked]) if semantic is not None else None,
                        changed_positions(target, source, threshold), [dataset.samples[it["index"]]["id"]
                                                                         for it in picked])


def _in_region(squared: torch.Tensor, changed: torch.Tensor) -> float:
    """Mean over the changed positions of the channel-mean squared value."""
    return float((squared.mean(1, keepdim=True) * changed).sum() / changed.sum())


def noised_inputs(samples: ProbeSamples, sigma: float, generator: torch.Generator):
    """(x_sigma, semantic tokens at sigma or None, timesteps (B,)): the target and the anchor tokens noised
    to `sigma`, the video noise drawn from `generator` before the semantic noise."""
    sigma_t = torch.tensor(float(sigma))
    x = add_noise(samples.target, torch.randn(samples.target.shape, generator=generator), sigma_t)
    sem = None
    if samples.semantic is not None:
        sem = add_noise(samples.semantic, torch.randn(samples.semantic.shape, generator=generator), sigma_t)
    return x, sem, timesteps_of(sigma_t).expand(x.shape[0])


@torch.no_grad()
def probe(model, samples: ProbeSamples, sigmas=(0.9, 0.5), seed: int = 0) -> list[dict]:
    """One row per sigma (see the module docstring); the noise comes from `seed`, in the order video noise,
    semantic noise, per sigma."""
    model = model.eval()
    own = pad_rows(samples.rows)
    wrong = pad_rows(samples.rows[1:] + samples.rows[:1])
    x0, src, changed = samples.target, samples.source, samples.changed
    generator = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas:
        x, sem, timestep = noised_inputs(samples, sigma, generator)
        with_own, with_wrong = (x - sigma * model(x, timestep, context, source=src, semantic_tokens=sem).video
                                for context in (own, wrong))
        out.append({"sigma": float(sigma),
                    "error": _in_region((with_own - x0) ** 2, changed),
                    "error_wrong_prompt": _in_region((with_wrong - x0) ** 2, changed),
                    "copy_error": _in_region((src - x0) ** 2, changed),
                    "text_effect": _in_region((with_own - with_wrong) ** 2, changed),
                    "error_outside": _in_region((with_own - x0) ** 2, 1 - changed),
                    "copy_error_outside": _in_region((src - x0) ** 2, 1 - changed)})
    return out


def attention_masses(q: torch.Tensor, k: torch.Tensor, num_source: int, num_semantic: int) -> dict:
    """Where the target tokens' self-attention goes, for one block. q, k (B, L, heads, hd) after RoPE, in
    SAMA's order [source][semantic][target] with as many target as source tokens. Returns the mean mass
    (over samples, heads and target queries) on the source token at the query's own position
    (`same_position`: what copying the source needs, since SAMA gives both the same RoPE positions), on all
    source tokens (`source`) and on the semantic tokens (`semantic`)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    weights = scores.softmax(-1)[:, :, -num_source:]  # (B, heads, target queries, L)
    to_source = weights[..., :num_source]
    return {"same_position": float(torch.diagonal(to_source, dim1=-2, dim2=-1).mean()),
            "source": float(to_source.sum(-1).mean()),
            "semantic": float(weights[..., num_source:num_source + num_semantic].sum(-1).mean())}


@torch.no_grad()
def attention_probe(model, samples: ProbeSamples, sigma: float = 1.0, seed: int = 0) -> list[dict]:
    """attention_masses of every block's self-attention in one model call at `sigma` (own prompts). The
    model's output is unchanged: each block's attention function is wrapped, not replaced."""
    model = model.eval()
    num_source = samples.source[0, 0].numel() // math.prod(model.config.patch_size)
    num_semantic = 0 if samples.semantic is None else samples.semantic.shape[1]
    rows, originals = [], [block.self_attn.attention for block in model.blocks]

    def recording(index, attend):
        def run(q, k, v):
            rows.append({"block": index, **attention_masses(q, k, num_source, num_semantic)})
            return attend(q, k, v)
        return run
    x, sem, timestep = noised_inputs(samples, sigma, torch.Generator().manual_seed(seed))
    try:
        for index, block in enumerate(model.blocks):
            block.self_attn.attention = recording(index, originals[index])
        model(x, timestep, pad_rows(samples.rows), source=samples.source, semantic_tokens=sem)
    finally:
        for block, attend in zip(model.blocks, originals):
            block.self_attn.attention = attend
    return rows


def load_probe_model(dit, checkpoint=None):
    """The DiT of `dit`, with the EMA weights of a train/ checkpoint folder when given."""
    if checkpoint is not None:
        return load_dit_with_ema(dit, checkpoint)
    from sama_core.loading import load_dit
    return load_dit(dit, dtype=torch.float32)


def format_table(rows: list[dict]) -> str:
    columns = ("error", "error_wrong_prompt", "copy_error", "text_effect", "error_outside", "copy_error_outside")
    lines = ["| sigma | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([f"{r['sigma']:.2f}"] + [f"{r[c]:.4f}" for c in columns]) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dit", required=True, help="DiT file (its config; the weights unless --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="a train/ checkpoint folder: probe its EMA weights")
    parser.add_argument("--cache", required=True, help="feature cache folder with edits (e.g. RUN/cache/stage1)")
    parser.add_argument("--limit", type=int, default=24, help="number of small edits (default 24)")
    parser.add_argument("--sigmas", default="0.9,0.5", help="comma list of noise levels (default 0.9,0.5)")
    parser.add_argument("--min-changed", type=float, default=0.003)
    parser.add_argument("--max-changed", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", action="store_true",
                        help="also: where the target tokens' self-attention goes, per block, at the first sigma")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        if args.limit < 2:
            raise SamaInputError(f"--limit must be at least 2 (the probe swaps prompts), got {args.limit}")
        try:
            sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]
        except ValueError:
            raise SamaInputError(f"--sigmas must be a comma list of numbers in (0, 1], got {args.sigmas!r}") from None
        if not sigmas or any(not 0 < s <= 1 for s in sigmas):
            raise SamaInputError(f"--sigmas must be a comma list of numbers in (0, 1], got {args.sigmas!r}")
        samples = small_edits(args.cache, args.limit, args.min_changed, args.max_changed)
        model = load_probe_model(args.dit, args.checkpoint)
        rows = probe(model, samples, sigmas, args.seed)
        attention = attention_probe(model, samples, sigmas[0], args.seed) if args.attention else None
    except SamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(samples.ids)} small edits of {args.cache} "
          f"({samples.changed.mean().item():.1%} of their latent positions changed)")
    print(format_table(rows))
    if attention:
        print(f"\nself-attention of the target tokens at sigma {sigmas[0]} (mean mass per query)\n")
        print("| block | own position in the source | all source | semantic |\n|---|---|---|---|")
        print("\n".join(f"| {r['block']} | {r['same_position']:.3f} | {r['source']:.3f} | {r['semantic']:.3f} |"
                        for r in attention))
    if args.json:
        Path(args.json).write_text(json.dumps({"ids": samples.ids, "rows": rows, "attention": attention},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
