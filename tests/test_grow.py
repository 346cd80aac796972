"""train.grow: a DiT deepened by zero-output copies computes what it did, and its new blocks can learn."""

import dataclasses

import pytest
import torch

from sama_core.loading import load_dit, save_dit
from sama_core.model import SamaDiT
from tiny_models import TINY, tiny_dit, tiny_inputs
from train.grow import OUTPUT_KEYS, grow_state_dict, grown_layout, main

TINY3 = dataclasses.replace(TINY, num_layers=3)


def grown_model(model: SamaDiT, layers: int) -> SamaDiT:
    grown = SamaDiT(dataclasses.replace(model.config, num_layers=layers)).eval()
    grown.load_state_dict(grow_state_dict(model.state_dict(), model.config.num_layers, layers))
    return grown


@pytest.mark.parametrize("layers, expected", [
    (3, [(0, False), (1, False), (2, False)]),
    (4, [(0, False), (1, False), (2, False), (2, True)]),
    (6, [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]),
    (7, [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True), (2, True)]),
])
def test_new_blocks_are_spread_evenly_after_the_block_they_copy(layers, expected):
    assert grown_layout(3, layers) == expected


@pytest.mark.parametrize("layers", [4, 6])
def test_grown_dit_computes_the_same_video_and_semantic_predictions(layers):
    model = tiny_dit(TINY3, seed=3)
    inputs = tiny_inputs(TINY3)
    grown = grown_model(model, layers)
    with torch.no_grad():
        before, after = model(**inputs), grown(**inputs)
    torch.testing.assert_close(after.video, before.video, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after.semantic, before.semantic, atol=1e-6, rtol=1e-6)
    # The new block is a real copy: apart from its zeroed outputs it equals the block before it.
    new_index, copied = next((j, i) for j, (i, new) in enumerate(grown_layout(3, layers)) if new)
    for name, value in model.blocks[copied].state_dict().items():
        expected = torch.zeros_like(value) if name in OUTPUT_KEYS else value
        assert torch.equal(grown.blocks[new_index].state_dict()[name], expected), name


def test_the_zeroed_projections_get_gradients_and_the_first_step_changes_the_output():
    model = tiny_dit(TINY3, seed=4)
    grown = grown_model(model, 4).train()
    inputs = tiny_inputs(TINY3)
    out = grown(**inputs)
    (out.video.square().mean() + out.semantic.square().mean()).backward()
    new = grown.blocks[3]  # the copy of block 2
    for name in ("self_attn.o.weight", "cross_attn.o.weight", "ffn.2.weight"):
        grad = new.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name
    with torch.no_grad():
        for p in grown.parameters():
            p -= 0.1 * p.grad
        moved = grown.eval()(**inputs)
    assert (moved.video - out.video.detach()).abs().max() > 1e-4


def test_command_line_writes_a_file_every_loader_reads(tmp_path, capsys):
    model = tiny_dit(TINY3, seed=5)
    save_dit(model, tmp_path / "dit.safetensors")
    assert main(["--dit", str(tmp_path / "dit.safetensors"), "--layers", "5",
                 "--out", str(tmp_path / "grown.safetensors")]) == 0
    assert "5 blocks" in capsys.readouterr().out
    grown = load_dit(tmp_path / "grown.safetensors", dtype=torch.float32).eval()
    assert grown.config == dataclasses.replace(TINY3, num_layers=5)
    inputs = tiny_inputs(TINY3)
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).video, model(**inputs).video, atol=1e-6, rtol=1e-6)


def test_command_line_refusals_name_the_flag(tmp_path, capsys):
    save_dit(tiny_dit(TINY3), tmp_path / "dit.safetensors")
    assert main(["--dit", str(tmp_path / "dit.safetensors"), "--layers", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--layers 2 is fewer than the DiT's 3" in capsys.readouterr().err
    assert main(["--dit", str(tmp_path / "missing.safetensors"), "--layers", "4", "--out", str(tmp_path / "o")]) == 2
    assert "--dit" in capsys.readouterr().err and not (tmp_path / "o").exists()
