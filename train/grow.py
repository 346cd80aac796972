"""Deepen a trained SAMA DiT without changing what it computes, to continue training with more capacity.

    python -m train.grow --dit stage1/final/sama_dit.safetensors --layers 12 --out grown.safetensors

Each new block is a copy of the block before it with its three output projections zeroed
(`self_attn.o`, `cross_attn.o`, `ffn.2`, weights and biases). A Wan block only adds to the residual stream
(x + gate * self_attn(...), x + cross_attn(...), x + gate * ffn(...)), so a block whose outputs are zero
is the identity and the grown DiT computes exactly what the trained one did; training then moves the
zeroed projections first (their gradients are the block's own activations, which are not zero) and the
copied weights give the new block a trained starting point instead of noise. The new blocks are spread
evenly: 6 -> 12 puts one after every block, 6 -> 8 one after the 3rd and the 6th.

Written here because no library deepens a DiT state dict (diffusers and peft load, adapt and merge
weights, but neither inserts layers); SAMA-Shapes uses it on a GPU lease (docs/sama_shapes.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path

import torch

from sama_core.cli import command_line
from sama_core.errors import SamaInputError

# The projections that write into the residual stream: zero them and the block adds nothing.
OUTPUT_KEYS = ("self_attn.o.weight", "self_attn.o.bias", "cross_attn.o.weight", "cross_attn.o.bias",
               "ffn.2.weight", "ffn.2.bias")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def grown_layout(num_layers: int, layers: int) -> list[tuple[int, bool]]:
    """For each block of the grown DiT: (the trained block it is copied from, whether it is new).
    The `layers - num_layers` new blocks are spread evenly, each after the block it copies."""
    if layers < num_layers:
        raise SamaInputError(f"--layers {layers} is fewer than the DiT's {num_layers}: growing only adds blocks")
    extra = layers - num_layers
    # Block i gets the new blocks whose evenly spaced slots fall in it: floor((i+1)*extra/n) - floor(i*extra/n).
    layout = []
    for i in range(num_layers):
        layout.append((i, False))
        new_here = (i + 1) * extra // num_layers - i * extra // num_layers
        layout.extend((i, True) for _ in range(new_here))
    return layout


def grow_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int, layers: int) -> dict[str, torch.Tensor]:
    """A state dict of `num_layers` blocks -> one of `layers` blocks that computes the same function."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    grown = {}
    for key, value in state_dict.items():
        match = BLOCK_KEY.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            grown[key] = value
    if sorted(blocks) != list(range(num_layers)):
        raise SamaInputError(f"the DiT file has blocks {sorted(blocks)}, expected 0..{num_layers - 1}")
    for j, (i, new) in enumerate(grown_layout(num_layers, layers)):
        for name, value in blocks[i].items():
            value = value.clone()
            if new and name in OUTPUT_KEYS:
                value.zero_()
            grown[f"blocks.{j}.{name}"] = value
    return grown


def grow_dit_file(path, layers: int, out) -> Path:
    """Read a DiT file (any layout sama_core loads), grow it to `layers` blocks, save it in official names
    with its config in the metadata and in the file's own precision."""
    from sama_core.loading import read_weights, resolve_config, save_dit

    weights = read_weights([str(path)])
    config = resolve_config(weights)
    state_dict = grow_state_dict(weights.state_dict, config.num_layers, layers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_dit(state_dict, out, config=dataclasses.replace(config, num_layers=layers))
    logging.getLogger(__name__).info("grew %s from %d to %d blocks -> %s", path, config.num_layers, layers, out)
    return out


@command_line()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.grow", description=__doc__.split("\n")[0])
    parser.add_argument("--dit", required=True, help="the trained DiT file (safetensors)")
    parser.add_argument("--layers", type=int, required=True, help="blocks of the grown DiT (>= the DiT's)")
    parser.add_argument("--out", required=True, help="the grown DiT file to write (safetensors)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not Path(args.dit).is_file():
        raise SamaInputError(f"--dit {args.dit} is not a file: give a DiT safetensors file")
    out = grow_dit_file(args.dit, args.layers, args.out)
    print(f"wrote {out} ({args.layers} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
